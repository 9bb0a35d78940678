"""README claims of editing, checked through the public API only (``edit_tokens``, ``LPD.logits``,
``LPDPipeline``): greedy editing is the argmax of the training pass over "known tokens, then
unknown" with the cfg ramp over the unknown tokens; the known tokens are prefilled in one forward
pass and come back exactly; only the unknown tokens are decoded, in steps of the scaled released
table and, for ``order="lpd"``, starting next to the known region; outpainting keeps the centre.

A probe model makes every row of the first block's input readable: the position embedding carries a
one-hot code of the raster position and ``mask_token`` a marker, so a forward pre-hook on
``blocks[0]`` sees which positions each forward pass reads as known tokens and which it queries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpd.editing import edit_tokens
from lpd.models import build_lpd
from lpd.sampling import SamplingConfig
from lpd.schedules import group_sizes, scaled_group_sizes

GRID, VOCAB, CLASSES = 8, 24, 5
N = GRID * GRID
CODE = 3.0  # one-hot magnitude of positions and of the query marker


def probe_model(seed: int = 0) -> torch.nn.Module:
    """A random LPD over an 8x8 grid whose embeddings name their position (dims 0..N-1) and queries
    (dim N)."""
    model = build_lpd(
        img_size=16 * GRID,
        embed_dim=N + 32,
        depth=2,
        num_heads=4,
        vocab_size=VOCAB,
        class_num=CLASSES,
    )
    model.initialize_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in (model.token_emb.weight, model.class_emb.weight, model.fake_latent):
            t[:, : N + 1] = 0.0
            t.mul_(25.0)  # tokens and classes matter next to the position code
        model.pos_embed[0, :, : N + 1] = 0.0
        model.pos_embed[0, 1:, :N] += CODE * torch.eye(N)
        model.mask_token.zero_()
        model.mask_token[0, 0, N] = CODE
    return model.eval()


class Probe:
    """Records, per forward pass of ``blocks[0]`` and per batch row, the known-token and query
    positions."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[list[list[int]], list[list[int]]]] = []
        self.handle = model.blocks[0].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        x = (args[0] if args else kwargs["x"]).detach().float()
        query = x[..., N] > CODE / 2  # after z_proj_ln the marker is ~7, elsewhere ~0
        # a known token carries its position; the condition row carries none
        token = ~query & (x[..., :N].max(-1).values > CODE / 2)
        pos = x[..., :N].argmax(-1)
        self.calls.append(
            (
                [pos[b][token[b]].tolist() for b in range(len(x))],
                [pos[b][query[b]].tolist() for b in range(len(x))],
            )
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def guided_argmax_ok(model, out, labels, known, known_sizes, orders, sizes, cfg) -> None:
    """``out``'s unknown tokens are the argmax of the cfg-guided training-pass logits (cfg linear
    over the unknown tokens) of the order "``known`` in ``known_sizes``, then ``orders`` in
    ``sizes``" fed ``out`` itself; margins below 1e-4 allow a tie."""
    B, m, n = len(out), known.shape[1], orders.shape[1]
    full = torch.cat([known, orders], 1)
    with torch.no_grad():
        cond = model.logits(out, torch.as_tensor(labels), full, [*known_sizes, *sizes])[
            :, m:
        ].double()
        uncond = model.logits(out, None, full, [*known_sizes, *sizes])[:, m:].double()
    scale = 1.0 + (cfg - 1.0) * torch.arange(n, dtype=torch.float64) / n
    guided = uncond + scale[None, :, None] * (cond - uncond)
    chosen = guided.gather(2, torch.gather(out, 1, orders)[..., None])[..., 0]
    gap = guided.max(-1).values - chosen
    assert gap.max() < 1e-4, (
        f"token {np.unravel_index(int(gap.argmax()), (B, n))} is not the guided argmax "
        f"({gap.max():.3g})"
    )


def test_greedy_edit_is_the_argmax_of_the_training_pass_known_then_unknown():
    """Raster order of the unknown part, a different mask per image (two counts): exact known
    tokens, and every regenerated token the guided argmax given the known tokens (prefill) and the
    earlier unknown ones."""
    model, g = probe_model(), torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (5, N), generator=g)
    keep = np.zeros((5, N), bool)
    for b, m in enumerate((24, 24, 24, 40, 40)):
        keep[b, np.random.RandomState(b).permutation(N)[:m]] = True
    labels, cfg, steps = [0, 3, 4, 1, 2], 4.0, 5
    out = edit_tokens(
        model,
        tokens,
        keep,
        labels,
        steps=steps,
        greedy=True,
        generator=g,
        sampling=SamplingConfig(order="raster", cfg=cfg),
    )
    assert torch.equal(out[torch.from_numpy(keep)], tokens[torch.from_numpy(keep)])
    assert (out[torch.from_numpy(~keep)] != tokens[torch.from_numpy(~keep)]).any()
    for rows in ([0, 1, 2], [3, 4]):
        orders = torch.stack([torch.from_numpy(np.flatnonzero(~keep[b])) for b in rows])
        known = torch.stack([torch.from_numpy(np.flatnonzero(keep[b])) for b in rows])
        sizes = scaled_group_sizes(orders.shape[1], steps, 16 * GRID)
        guided_argmax_ok(
            model, out[rows], [labels[b] for b in rows], known, [known.shape[1]], orders, sizes, cfg
        )


@pytest.mark.parametrize("order, prefill", [("lpd", "one"), ("random", "one"), ("lpd", "schedule")])
def test_edit_prefills_once_then_decodes_only_the_unknown_tokens_in_scaled_steps(order, prefill):
    """The first forward pass reads exactly the known tokens (the prefill, with the first queries);
    the ``steps`` passes query each unknown position once, in groups of ``scaled_group_sizes``; the lpd order starts next to
    the known region; and the result is the guided argmax of the training pass over the order that
    was decoded, the known tokens laid out as one group or (``schedule``) in the order read, grouped
    as the first tokens of the 20-step table."""
    model, g = probe_model(), torch.Generator().manual_seed(2)
    halves = np.zeros((4, GRID, GRID), bool)
    (
        halves[0, GRID // 2 :],
        halves[1, : GRID // 2],
        halves[2, :, : GRID // 2],
        halves[3, :, GRID // 2 :],
    ) = True, True, True, True
    keep = np.concatenate([halves, halves]).reshape(
        8, N
    )  # 32 known tokens each, four different halves
    tokens = torch.randint(0, VOCAB, (8, N), generator=g)
    labels, cfg, steps = [0, 1, 2, 3, 4, 0, 1, 2], 3.0, 6
    with Probe(model) as probe:
        out = edit_tokens(
            model,
            tokens,
            keep,
            labels,
            steps=steps,
            greedy=True,
            generator=g,
            prefill=prefill,
            sampling=SamplingConfig(order=order, cfg=cfg),
        )
    assert torch.equal(out[torch.from_numpy(keep)], tokens[torch.from_numpy(keep)])
    assert len(probe.calls) == steps  # the known tokens enter with the first step's queries
    known_rows, steps_seen = probe.calls[0][0], probe.calls
    sizes = scaled_group_sizes(N // 2, steps, 16 * GRID)
    orders = []
    for b in range(8):  # rows b (conditional) and 8 + b (unconditional) see the same positions
        assert sorted(known_rows[b]) == np.flatnonzero(keep[b]).tolist()
        assert known_rows[8 + b] == known_rows[b]
        groups = [q[b] for _, q in steps_seen]
        assert [len(gr) for gr in groups] == sizes and all(q[8 + b] == q[b] for _, q in steps_seen)
        orders.append([p for gr in groups for p in gr])
        assert (
            sorted(orders[-1]) == np.flatnonzero(~keep[b]).tolist()
        )  # every unknown position once, no known one
    orders, known = torch.tensor(orders), torch.tensor(known_rows[:8])
    ends = np.minimum(np.cumsum(group_sizes(16 * GRID, 20)), N // 2)
    known_sizes = (
        [N // 2] if prefill == "one" else [int(d) for d in np.diff(ends, prepend=0) if d > 0]
    )
    guided_argmax_ok(model, out, labels, known, known_sizes, orders, sizes, cfg)
    first = orders[:, : sizes[0]].numpy()
    next_to_known = np.array(
        [
            [
                any(
                    keep[b].reshape(GRID, GRID)[r + dr, c + dc]
                    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                    if 0 <= r + dr < GRID and 0 <= c + dc < GRID
                )
                for r, c in zip(*divmod(first[b], GRID))
            ]
            for b in range(8)
        ]
    )
    if order == "lpd":
        assert next_to_known.all(), first  # step 0 already follows proximity to the known half
    else:
        assert (
            not next_to_known.all()
        )  # a uniform first position lands away from the known half as well


def test_outpaint_keeps_the_centre_exactly_and_regenerates_the_border():
    """``LPDPipeline.outpaint``: with an exact tokenizer the kept centre comes back pixel for pixel,
    the border is regenerated (a quarter of the size by default), and ``border:PX`` regions mean the
    same."""
    from lpd.pipeline import LPDPipeline
    from lpd.tokenizer.palette import PaletteTokenizer

    model = build_lpd(
        img_size=128, embed_dim=32, depth=2, num_heads=4, vocab_size=4, class_num=CLASSES
    )
    model.initialize_weights(torch.Generator().manual_seed(3))
    pipe = LPDPipeline(model, PaletteTokenizer(levels=4), name=None)
    source = np.repeat(
        np.repeat(np.random.RandomState(0).randint(0, 4, (GRID, GRID)) * 85, 16, 0), 16, 1
    )
    source = np.repeat(source[:, :, None], 3, 2).astype(np.uint8)  # palette greys: encoded exactly
    out = pipe.outpaint(source, 2, num=3, steps=4, seed=0, cfg=3.0)
    edits, centre = out["edits"], (slice(32, 96), slice(32, 96))
    assert np.array_equal(out["source"], source) and edits.shape == (3, 128, 128, 3)
    assert all(np.array_equal(e[centre], source[centre]) for e in edits)
    border = np.ones((128, 128), bool)
    border[centre] = False
    assert all((e[border] != source[border]).any() for e in edits)
    assert (out["masked"][border] != source[border]).any() and np.array_equal(
        out["masked"][centre], source[centre]
    )
    same = pipe.inpaint(source, "border:32", 2, num=3, steps=4, seed=0, cfg=3.0)
    assert np.array_equal(same["edits"], edits)
