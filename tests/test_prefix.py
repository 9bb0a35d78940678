"""The condition as a prefix of L rows with a key-padding mask: padded rows change no logit
(training pass and cached decoding), teacher-forced decoding equals the training pass, the
Decoder's steps."""

from __future__ import annotations

import warnings

import pytest
import torch

from lpd.models import build_lpd
from lpd.sampling import Decoder, SamplingConfig, sample_tokens

L, D = 5, 32


@pytest.fixture(scope="module", params=[0.0, 0.5], ids=["absolute", "rope"])
def model(request):
    torch.manual_seed(0)
    arch = dict(img_size=64, embed_dim=D, depth=2, num_heads=4, vocab_size=24, class_num=5)
    return build_lpd(**arch, rope=request.param).eval()


def prefix_inputs(model, B: int, seed: int):
    """Tokens, orders, condition rows ``[B, L, D]`` and a padding mask with lengths 1..L."""
    g = torch.Generator().manual_seed(seed)
    N = model.num_tokens
    tokens = torch.randint(0, model.vocab_size, (B, N), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    cond = torch.randn(B, L, D, generator=g)
    lengths = torch.tensor([1 + (3 * b + 2) % L for b in range(B)])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    mask[0] = torch.tensor([True, False, True, False, False])  # padding need not be at the end
    return tokens, orders, cond, mask


def repad(cond, mask, seed):
    """``cond`` with other (large) content in its padded rows."""
    noise = 50 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(mask[..., None], cond, noise)


SIZES = [[1, 2, 3, 10], [4, 4, 8], [16], [3, 1, 7, 5]]


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_padded_prefix_rows_change_no_training_logit(model, attn):
    tokens, orders, cond, mask = prefix_inputs(model, 4, seed=1)
    model.set_attn_impl(attn)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # flex_attention called without torch.compile
            for sizes in (
                SIZES[:2] if attn == "flex" else SIZES
            ):  # flex on a CPU: torch's slow reference
                a = model.logits(tokens, None, orders, sizes, cond=cond, cond_mask=mask)
                b = model.logits(
                    tokens, None, orders, sizes, cond=repad(cond, mask, 2), cond_mask=mask
                )
                assert (a - b).abs().max().item() == 0.0
                unmasked = model.logits(tokens, None, orders, sizes, cond=repad(cond, mask, 2))
                assert (
                    a - unmasked
                ).abs().max().item() > 1e-3  # without the mask the rows are seen
    finally:
        model.set_attn_impl("auto")


def test_dense_and_flex_prefix_masks_agree(model):
    tokens, orders, cond, mask = prefix_inputs(model, 3, seed=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dense = model.logits(tokens, None, orders, [1, 2, 3, 10], cond=cond, cond_mask=mask)
        model.set_attn_impl("flex")
        try:
            flex = model.logits(tokens, None, orders, [1, 2, 3, 10], cond=cond, cond_mask=mask)
        finally:
            model.set_attn_impl("auto")
    assert (dense - flex).abs().max().item() < 1e-5


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n_known", [0, 2])
def test_teacher_forced_decoding_with_a_padded_prefix_equals_the_training_pass(
    model, cfg, static, n_known
):
    """Guidance doubles the batch (the null rows: other content and padding); known groups are fed
    with the prefix; static plans prefill a prefix of several rows before the compiled steps."""
    tokens, orders, cond, mask = prefix_inputs(model, 3, seed=5)
    null = torch.randn(3, L, D, generator=torch.Generator().manual_seed(6))
    null_mask = torch.ones(3, L, dtype=torch.bool)
    null_mask[:, 3:] = False
    prefix, prefix_mask = (
        (torch.cat([cond, null]), torch.cat([mask, null_mask])) if cfg != 1.0 else (cond, mask)
    )
    decoder = Decoder(
        model, SamplingConfig(cfg=cfg), compile={"backend": "eager"} if static else False
    )
    forced = torch.gather(tokens, 1, orders)
    for sizes in [s for s in SIZES if len(s) > n_known]:
        n = sum(sizes[:n_known])  # the tokens of the first n_known groups are known
        got = decoder.logits(prefix, orders, sizes, forced, n_known=n, prefix_mask=prefix_mask)
        repadded = decoder.logits(
            repad(prefix, prefix_mask, 7), orders, sizes, forced, n_known=n, prefix_mask=prefix_mask
        )
        with torch.no_grad():
            want = model.logits(tokens, None, orders, sizes, cond=cond, cond_mask=mask)
            if cfg != 1.0:
                want = torch.cat(
                    [
                        want,
                        model.logits(tokens, None, orders, sizes, cond=null, cond_mask=null_mask),
                    ]
                )
        assert got.shape == (3 * (1 + (cfg != 1.0)), 16 - n, model.vocab_size)
        assert (got - want[:, n:]).abs().max().item() < 1e-5
        assert (got - repadded).abs().max().item() == 0.0
    assert not decoder.compile_failed


def test_sampling_with_a_padded_prefix_ignores_the_padded_rows(model):
    _, orders, cond, mask = prefix_inputs(model, 4, seed=8)
    decoder = Decoder(model, SamplingConfig(temperature=1.5, top_k=10))

    def draw(c):
        generator = torch.Generator().manual_seed(3)
        return decoder.decode(c, orders, [1, 3, 5, 7], prefix_mask=mask, generator=generator)

    assert torch.equal(draw(cond), draw(repad(cond, mask, 9)))


def test_a_class_label_is_one_prefix_row(model):
    tokens, orders, _, _ = prefix_inputs(model, 3, seed=10)
    labels = torch.tensor([0, 2, 4])
    rows = model.embed_condition(labels, 3)
    assert rows.shape == (3, 1, D)
    with torch.no_grad():
        assert torch.equal(
            model.logits(tokens, labels, orders, [4, 12]),
            model.logits(tokens, None, orders, [4, 12], cond=rows),
        )
    with pytest.raises(ValueError, match="cond must be"):
        model.logits(tokens, labels, orders, [4, 12], cond=rows)
    with pytest.raises(ValueError, match="cond_mask must be bool"):
        model.logits(
            tokens, None, orders, [4, 12], cond=rows, cond_mask=torch.ones(3, 2, dtype=torch.bool)
        )


def test_steps_stream_the_tokens_decoded_so_far(model):
    _, orders, _, _ = prefix_inputs(model, 2, seed=11)
    labels, sizes = torch.tensor([1, 3]), [1, 3, 5, 7]
    decoder = Decoder(model, SamplingConfig(cfg=2.0))
    seen = []
    for step in decoder.steps(
        decoder.class_prefix(labels, 2), orders, sizes, generator=torch.Generator().manual_seed(0)
    ):
        assert step.logits.shape == (
            4,
            step.last - step.first,
            model.vocab_size,
        )  # both guidance halves
        seen.append((step.first, step.last, step.tokens[:, : step.last].clone()))
    assert [(a, b) for a, b, _ in seen] == [(0, 1), (1, 4), (4, 9), (9, 16)]
    final = torch.empty_like(seen[-1][2]).scatter_(1, orders, seen[-1][2])
    assert torch.equal(
        final,
        sample_tokens(
            model,
            labels,
            orders,
            sizes,
            generator=torch.Generator().manual_seed(0),
            sampling=SamplingConfig(cfg=2.0),
        ),
    )
    for _, last, so_far in seen:  # every frame is a prefix of the final tokens
        assert torch.equal(so_far, seen[-1][2][:, :last])
