"""KV-cached parallel decoding (spec section 3): one forward per group of tokens.

Cache slot 0 holds the condition and decoding group ``k`` occupies slots ``[S_k, S_{k+1})`` with
``S_k = 1 + g_0 + ... + g_{k-1}``.  Step ``k`` feeds the real tokens of group ``k-1`` (step 0: the
condition) together with the position queries of group ``k``; those inputs sit in the contiguous
slots ``[S_{k-1}, S_{k+1})``.  Each input attends to every slot up to the end of its own block, so
the queries see each other (group-visible) and the query slots are overwritten by real tokens at
step ``k+1``.  With teacher forcing the outputs equal the training pass's logits.

Everything that does not change between steps is prepared once per call: the static caches, the
query embeddings of all positions (``z_proj_ln(mask_token + pos_embed)``), the per-step masks
(cached per schedule), one input buffer that every step writes its rows into (the CFG halves by a
broadcasting copy, no concatenation) and the random numbers; nothing waits on the device inside
the loop.  ``compile=True`` runs each step as one ``torch.compile`` d graph with static shapes
(:func:`static_layout`: every step padded to the longest step, attention over the whole cache
through a per-step mask; gpt-fast style), and ``autocast_dtype=torch.bfloat16`` decodes under
autocast on any device.  Tokens are drawn by inverse-CDF sampling with one uniform number per token
(exactly the categorical distribution after temperature / top-k / top-p), which avoids the
full-vocabulary noise of ``torch.multinomial``; the uniforms for image ``i`` come from its own
generator when a list is given, so an image does not depend on the batch it was decoded in.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lpd.models.lpd import LPD
from lpd.schedules import validate_group_sizes

__all__ = [
    "sample_tokens",
    "teacher_forced_logits",
    "decode_schedule",
    "DecodeSchedule",
    "static_layout",
    "StaticLayout",
    "cfg_scales",
    "filter_and_sample",
    "check_sampling_args",
    "compiled_step",
    "cpu_has_native_bf16",
    "warn_if_emulated_bf16",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class DecodeSchedule:
    """Static per-step layout for a group-size schedule (independent of the model's weights)."""

    group_sizes: tuple[int, ...]
    starts: tuple[int, ...]  # S_k, k = 0..K (S_K = 1 + N)
    masks: tuple[torch.Tensor | None, ...]  # per step [T_k, S_{k+1}] bool, None when all True

    def step(self, k: int) -> tuple[int, int, int, int]:
        """(write start, kv_len, first generation index, last generation index + 1) of step ``k``."""
        start = 0 if k == 0 else self.starts[k - 1]
        return start, self.starts[k + 1], self.starts[k] - 1, self.starts[k + 1] - 1


_SCHEDULE_CACHE: dict[tuple, DecodeSchedule] = {}


def decode_schedule(group_sizes: Sequence[int], device: torch.device | str) -> DecodeSchedule:
    """Slots and attention masks of every decoding step, built once per (schedule, device)."""
    key = (tuple(group_sizes), str(device))
    sched = _SCHEDULE_CACHE.get(key)
    if sched is not None:
        return sched
    starts = [1]
    for g in group_sizes:
        starts.append(starts[-1] + g)
    masks = []
    for k in range(len(group_sizes)):
        start = 0 if k == 0 else starts[k - 1]
        n_prev = starts[k] - start  # real tokens of group k-1 (or the condition slot)
        kv_len = starts[k + 1]
        T = kv_len - start
        mask = torch.ones(T, kv_len, dtype=torch.bool)
        mask[:n_prev, starts[k]:] = False  # real tokens see only up to the end of their own block
        masks.append(mask.to(device))
    sched = DecodeSchedule(tuple(group_sizes), tuple(starts), tuple(masks))
    _SCHEDULE_CACHE[key] = sched
    return sched


@dataclass(frozen=True)
class StaticLayout:
    """Static-shape layout of a schedule (the ``compile=True`` path).

    Every step feeds ``rows`` inputs: ``pads[k]`` padding rows, then the real tokens of group
    ``k-1`` (step 0: the condition), then the queries of group ``k``.  Row ``t`` writes its keys and
    values into slot ``write_pos[k][t]`` of caches with ``num_slots = N + 2`` slots (the last one a
    scratch slot that padding rows write to and nobody reads) and attends through
    ``masks[k] [rows, num_slots]``; padding rows see slot 0 only, so they stay finite.  The head
    runs on the last ``num_out = max(g)`` rows.
    """

    rows: int
    num_out: int
    num_slots: int
    pads: tuple[int, ...]
    write_pos: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]


_LAYOUT_CACHE: dict[tuple, StaticLayout] = {}


def static_layout(group_sizes: Sequence[int], device: torch.device | str) -> StaticLayout:
    """The padded per-step layout of a schedule, built once per (schedule, device)."""
    key = (tuple(group_sizes), str(device))
    layout = _LAYOUT_CACHE.get(key)
    if layout is not None:
        return layout
    sched = decode_schedule(group_sizes, "cpu")
    K = len(sched.group_sizes)
    num_slots = sched.starts[-1] + 1
    scratch = num_slots - 1
    spans = [sched.step(k) for k in range(K)]
    rows = max(kv_len - start for start, kv_len, _, _ in spans)
    pads, write_pos, masks = [], [], []
    for k, (start, kv_len, _, _) in enumerate(spans):
        T = kv_len - start
        n_prev = sched.starts[k] - start
        pad = rows - T
        pos = torch.full((rows,), scratch, dtype=torch.long)
        pos[pad:] = torch.arange(start, kv_len)
        mask = torch.zeros(rows, num_slots, dtype=torch.bool)
        mask[:pad, 0] = True
        mask[pad : pad + n_prev, : sched.starts[k]] = True  # real tokens: up to the end of their block
        mask[pad + n_prev :, :kv_len] = True  # queries: everything decoded so far and their group
        pads.append(pad)
        write_pos.append(pos.to(device))
        masks.append(mask.to(device))
    layout = StaticLayout(rows, max(sched.group_sizes), num_slots, tuple(pads), tuple(write_pos), tuple(masks))
    _LAYOUT_CACHE[key] = layout
    return layout


def check_sampling_args(cfg: float, cfg_schedule: str, temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` with a fix for out-of-range sampling settings."""
    if not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0 (1.0 = no guidance), got {cfg}")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p}")


def cfg_scales(cfg: float, schedule: str, first: int, last: int, num_tokens: int, device: torch.device) -> torch.Tensor | float:
    """Guidance scale of the tokens ``first..last-1`` in generation order: ``[g, 1]`` or a float."""
    if schedule == "constant":
        return cfg
    j = torch.arange(first, last, device=device, dtype=torch.float32)
    return (1.0 + (cfg - 1.0) * j / num_tokens)[:, None]


def filter_and_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Draw one token per row of ``logits [M, V]`` from the tempered, top-k, top-p distribution.

    Inverse-CDF sampling with ``uniforms [M]`` in [0, 1): the first token whose cumulative
    probability exceeds ``u`` times the kept mass.  Exactly the categorical distribution; one random
    number per token.
    """
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip a pass over the vocabulary
        logits = logits / max(temperature, 1e-5)
    V = logits.shape[-1]
    if (top_k and top_k < V) or top_p < 1.0:
        if top_k and top_k < V:
            vals, idx = logits.topk(int(top_k), dim=-1)
        else:
            vals, idx = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(vals, dim=-1)
        if top_p < 1.0:
            before = probs.cumsum(-1) - probs
            probs = probs * (before < top_p)  # the smallest head reaching top_p; always >= 1 token
    else:
        idx = None
        probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True)
    # Guard against landing past the last positive-probability entry through rounding: only a row
    # whose target reaches the total (``pick == len``) can, since ``cdf[pick] > target`` implies
    # ``probs[pick] > 0``; such a row takes the last positive entry.  On the CPU the (rare) check
    # costs nothing; elsewhere it runs for every row so that nothing waits on the device.
    n = cdf.shape[-1]
    if pick.device.type == "cpu":
        over = pick >= n
        if bool(over.any()):
            pick = torch.where(over, (probs > 0).cumsum(-1).argmax(-1, keepdim=True), pick)
    else:
        pick = torch.minimum(pick.clamp_(max=n - 1), (probs > 0).cumsum(-1).argmax(-1, keepdim=True))
    return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)


def _uniforms(generator: GeneratorArg, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(batch, num_tokens, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, num_tokens, generator=generator, device=generator.device).to(device)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}; pass one per image or a single one")
    return torch.stack([torch.rand(num_tokens, generator=g, device=g.device).to(device) for g in gens])


def _as_long(x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, device=device).long()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


StepFn = Callable[[torch.Tensor, list, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _decode(
    model: LPD,
    labels: torch.Tensor | None,
    orders: torch.Tensor,
    group_sizes: Sequence[int],
    cfg: float,
    choose: Callable[[torch.Tensor, int, int], torch.Tensor],
    on_step: Callable[[torch.Tensor], None] | None = None,
    static_step: StepFn | None = None,
) -> torch.Tensor:
    """Shared decoding loop; ``choose(head_out, first, last)`` returns the ``[B, g]`` tokens of a step.

    With ``static_step`` (the signature of :meth:`LPD.forward_static`, e.g. its compiled form)
    every step has the static shapes of :func:`static_layout`; otherwise each step feeds exactly
    its own rows through :meth:`LPD.forward_cached`.
    """
    device = model.pos_embed.device
    N = model.num_tokens
    B = orders.shape[0]
    copies = 2 if cfg != 1.0 else 1  # CFG: [conditional; unconditional] halves of one batch
    sched = decode_schedule(group_sizes, device)
    layout = static_layout(group_sizes, device) if static_step is not None else None

    pos = model.position_embeddings(orders)  # [B, N, D], generation order
    queries = model.z_proj_ln(model.mask_token + pos)  # every query embedded once
    cond = model.embed_condition(labels, B)
    if copies == 2:
        cond = torch.cat([cond, model.embed_condition(None, B).to(cond.dtype)])
    first_row = model.z_proj_ln(cond + model.pos_embed[0, 0]).unsqueeze(1)  # [copies * B, 1, D]
    D = queries.shape[-1]

    if layout is None:
        caches = model.new_caches(copies * B, device)
        rows_max = max(kv_len - start for start, kv_len, _, _ in map(sched.step, range(len(sched.group_sizes))))
        flat = torch.empty(copies * B * rows_max * D, dtype=queries.dtype, device=device)
    else:
        caches = model.new_caches(copies * B, device, num_slots=layout.num_slots)
        with torch.no_grad():  # the dtype keys get inside the blocks (bf16 under autocast)
            kv_dtype = model.blocks[0].attn.qkv(queries[:1, :1]).dtype
        for c in caches:
            c.allocate(kv_dtype)
        static_x = torch.zeros(copies * B, layout.rows, D, dtype=queries.dtype, device=device)
    tokens_gen = torch.empty(B, N, dtype=torch.long, device=device)

    prev: torch.Tensor | None = None  # embedded real tokens of the previous group, [B, g, D]
    for k, g in enumerate(sched.group_sizes):
        start, kv_len, first, last = sched.step(k)
        T = kv_len - start
        n_prev = T - g
        if layout is None:
            x = flat[: copies * B * T * D].view(copies * B, T, D)
            off = 0
        else:
            x = static_x
            off = layout.pads[k]
        halves = x.view(copies, B, x.shape[1], D)  # both CFG halves receive the same rows
        if prev is None:
            x[:, off : off + 1] = first_row
        else:
            halves[:, :, off : off + n_prev] = prev
        halves[:, :, off + n_prev :] = queries[:, first:last]
        if layout is None:
            out = model.forward_cached(x, caches, start, kv_len, sched.masks[k], g)
        else:
            out = static_step(x, caches, layout.write_pos[k], layout.masks[k], layout.num_out)
            out = out[:, layout.num_out - g :]
        if on_step is not None:
            on_step(out)
        chosen = choose(out, first, last)
        tokens_gen[:, first:last] = chosen
        if k + 1 < len(sched.group_sizes):
            prev = model.z_proj_ln(model.token_emb(chosen) + pos[:, first:last])
    return tokens_gen


# ---------------------------------------------------------------------------------------------
# torch.compile of the static-shape step
# ---------------------------------------------------------------------------------------------

_COMPILED_STEPS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, bool]]] = {}


def _static_step(model: LPD, x: torch.Tensor, caches: list, write_pos: torch.Tensor, mask: torch.Tensor, num_out: int) -> torch.Tensor:
    return model.forward_static(x, caches, write_pos, mask, num_out)


def _compile_options(compile: bool | str | dict) -> dict[str, Any]:
    if compile is True:
        return {}
    if isinstance(compile, str):
        return {"mode": compile}
    if isinstance(compile, dict):
        return dict(compile)
    raise ValueError(f"compile must be False, True, a torch.compile mode string or a dict of torch.compile options, got {compile!r}")


def compiled_step(model: LPD, compile: bool | str | dict = True) -> StepFn:
    """The static-shape step :meth:`LPD.forward_static` of ``model`` under ``torch.compile``.

    One compiled function per set of options (it holds no model); torch compiles one graph per
    model and distinct static shape (schedule x batch) the first time it meets them, up to
    dynamo's cache limit.  If compilation fails (no C++ compiler, an unsupported torch build,
    ...), a warning is issued once and the step runs eagerly with the same static shapes
    (identical tokens, no speed-up).
    """
    options = _compile_options(compile)
    options.setdefault("dynamic", False)
    key = repr(sorted(options.items()))
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = (torch.compile(_static_step, **options), {"failed": False})
    compiled, state = _COMPILED_STEPS[key]

    def step(x: torch.Tensor, caches: list, write_pos: torch.Tensor, mask: torch.Tensor, num_out: int) -> torch.Tensor:
        if not state["failed"]:
            try:
                return compiled(model, x, caches, write_pos, mask, num_out)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                state["failed"] = True
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                warnings.warn(
                    f"torch.compile of the decoding step failed ({type(e).__name__}: {first_line}); "
                    f"decoding eagerly with static shapes instead (same tokens, no speed-up)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return model.forward_static(x, caches, write_pos, mask, num_out)

    step.fallback = state  # type: ignore[attr-defined]  # inspected by the tests
    return step


def _prepare(model: LPD, labels, orders, group_sizes) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    device = model.pos_embed.device
    N = model.num_tokens
    orders = _as_long(orders, device)
    if orders.dim() != 2 or orders.shape[1] != N:
        raise ValueError(f"orders must have shape [B, {N}] for this model's {model.grid_size}x{model.grid_size} grid, got {list(orders.shape)}")
    if not torch.equal(orders.sort(dim=1).values, torch.arange(N, device=device).expand_as(orders)):
        bad = int((orders.sort(dim=1).values != torch.arange(N, device=device)).any(1).nonzero()[0])
        raise ValueError(f"orders row {bad} is not a permutation of 0..{N - 1}")
    sizes = validate_group_sizes(group_sizes, N)
    if labels is not None:
        labels = _as_long(labels, device)
        if labels.shape != (orders.shape[0],):
            raise ValueError(f"labels must have shape [{orders.shape[0]}] (one per order), got {list(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= model.class_num):
            raise ValueError(f"labels must be in 0..{model.class_num - 1}")
    return labels, orders, sizes


@torch.no_grad()
def sample_tokens(
    model: LPD,
    labels: torch.Tensor | None,
    orders: torch.Tensor | np.ndarray,
    group_sizes: Sequence[int],
    *,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: GeneratorArg = None,
    compile: bool | str | dict = False,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate ``[B, N]`` token indices in raster order with ``len(group_sizes)`` forward passes.

    ``labels`` ``[B]`` class indices, or ``None`` for unconditional samples (``fake_latent``; needs
    ``cfg == 1``).  ``orders`` ``[B, N]``: raster positions in generation order.  CFG runs the
    conditional and unconditional branches as one doubled batch; ``cfg_schedule='linear'`` gives
    the ``j``-th generated token the scale ``1 + (cfg - 1) j / N``.  ``generator``: one
    ``torch.Generator`` for the batch, or a list with one per image (then image ``i`` depends only
    on its own generator).

    Speed options (the tokens do not depend on them beyond float rounding):

    * ``compile``: ``True`` (or a ``torch.compile`` mode such as ``'reduce-overhead'``, or a dict of
      ``torch.compile`` options) runs every step as one compiled graph with static shapes
      (:func:`static_layout`; padding costs extra work when group sizes vary, nothing at one token
      per step); compiled once per model, schedule and batch size.  Falls back to eager with a
      warning if compilation fails.
    * ``autocast_dtype``: e.g. ``torch.bfloat16`` decodes under ``torch.autocast`` on the model's
      device (the same as calling this inside ``torch.autocast``).
    """
    check_sampling_args(cfg, cfg_schedule, temperature, top_k, top_p)
    labels, orders, sizes = _prepare(model, labels, orders, group_sizes)
    if labels is None and cfg != 1.0:
        raise ValueError("classifier-free guidance needs labels; use cfg=1.0 for unconditional sampling")
    B, N = orders.shape
    device = orders.device
    uniforms = None if greedy else _uniforms(generator, B, N, device)

    def choose(out: torch.Tensor, first: int, last: int) -> torch.Tensor:
        if cfg != 1.0:
            c, u = out[:B].float(), out[B:].float()
            logits = c - u  # u + s * (c - u), in place: same arithmetic, fewer buffers
            logits.mul_(cfg_scales(cfg, cfg_schedule, first, last, N, device)).add_(u)
        else:
            logits = out.float()
        if greedy:
            return logits.argmax(-1)
        g = last - first
        flat = filter_and_sample(logits.reshape(B * g, -1), uniforms[:, first:last].reshape(-1), temperature, top_k, top_p)
        return flat.view(B, g)

    static_step = compiled_step(model, compile) if compile is not False else None
    if autocast_dtype is not None:
        warn_if_emulated_bf16(device, autocast_dtype)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with _eval_mode(model), amp:
        tokens_gen = _decode(model, labels, orders, sizes, cfg, choose, static_step=static_step)
    tokens = torch.empty_like(tokens_gen)
    tokens.scatter_(1, orders, tokens_gen)
    return tokens


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).  Without either, oneDNN
    emulates bf16 matrix products and bf16 runs several times slower than fp32 (measured on an
    AVX512 Xeon without them: about 23 vs 77 GFLOP/s, benchmarks/README.md)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(p()) for p in probes if p is not None)
    except Exception:  # a torch without the probes: assume the hardware is fine rather than nag
        return True


_WARNED_BF16 = False


def warn_if_emulated_bf16(device: torch.device | str, dtype: torch.dtype | None) -> None:
    """Warn once per process when bf16 is asked for on a CPU that can only emulate it."""
    global _WARNED_BF16
    if _WARNED_BF16 or dtype != torch.bfloat16 or torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return
    _WARNED_BF16 = True
    warnings.warn("bf16 on this CPU is emulated (no AVX512-BF16 or AMX instructions) and is usually "
                  "slower than fp32; leave bf16 off here (it pays on GPUs and on CPUs with AMX)",
                  RuntimeWarning, stacklevel=3)


@torch.no_grad()
def teacher_forced_logits(
    model: LPD,
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    orders: torch.Tensor | np.ndarray,
    group_sizes: Sequence[int],
    cfg: float = 1.0,
) -> torch.Tensor:
    """Raw head outputs of KV-cached decoding fed the given ``tokens`` (raster) instead of samples.

    Returns ``[B, N, V]`` in generation order, or ``[2B, N, V]`` (conditional rows first) when
    ``cfg != 1``; they equal :meth:`LPD.logits` with ``labels`` (and ``None``) up to float error.
    """
    labels, orders, sizes = _prepare(model, labels, orders, group_sizes)
    B, N = orders.shape
    tokens_gen = torch.gather(_as_long(tokens, orders.device).reshape(B, N), 1, orders)
    outs: list[torch.Tensor] = []

    def choose(out: torch.Tensor, first: int, last: int) -> torch.Tensor:
        return tokens_gen[:, first:last]

    with _eval_mode(model):
        _decode(model, labels, orders, sizes, cfg, choose, on_step=outs.append)
    return torch.cat(outs, dim=1)
