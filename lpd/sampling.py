"""KV-cached parallel decoding (spec section 3): one forward per group of tokens.

Cache slot 0 holds the condition and decoding group ``k`` occupies slots ``[S_k, S_{k+1})`` with
``S_k = 1 + g_0 + ... + g_{k-1}``.  Step ``k`` feeds the real tokens of group ``k-1`` (step 0: the
condition) together with the position queries of group ``k``; those inputs sit in the contiguous
slots ``[S_{k-1}, S_{k+1})``.  Each input attends to every slot up to the end of its own block, so
the queries see each other (group-visible) and the query slots are overwritten by real tokens at
step ``k+1``.  With teacher forcing the outputs equal the training pass's logits.

Everything that does not change between steps is prepared once per call: the static caches, the
query embeddings of all positions (``z_proj_ln(mask_token + pos_embed)``), the per-step masks and
the random numbers.  Tokens are drawn by inverse-CDF sampling with one uniform number per token
(exactly the categorical distribution after temperature / top-k / top-p), which avoids the
full-vocabulary noise of ``torch.multinomial``; the uniforms for image ``i`` come from its own
generator when a list is given, so an image does not depend on the batch it was decoded in.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from lpd.models.lpd import LPD
from lpd.schedules import validate_group_sizes

__all__ = [
    "sample_tokens",
    "teacher_forced_logits",
    "decode_schedule",
    "DecodeSchedule",
    "cfg_scales",
    "filter_and_sample",
    "check_sampling_args",
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
    logits = logits.float() / max(temperature, 1e-5)
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
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # Guard against landing on a zero-probability tail entry through rounding.
    pick = torch.minimum(pick, (probs > 0).cumsum(-1).argmax(-1, keepdim=True))
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


def _decode(
    model: LPD,
    labels: torch.Tensor | None,
    orders: torch.Tensor,
    group_sizes: Sequence[int],
    cfg: float,
    choose: Callable[[torch.Tensor, int, int], torch.Tensor],
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Shared decoding loop; ``choose(head_out, first, last)`` returns the ``[B, g]`` tokens of a step."""
    device = model.pos_embed.device
    N = model.num_tokens
    B = orders.shape[0]
    use_cfg = cfg != 1.0
    sched = decode_schedule(group_sizes, device)

    pos = model.position_embeddings(orders)  # [B, N, D], generation order
    queries = model.z_proj_ln(model.mask_token + pos)  # every query embedded once
    cond = model.embed_condition(labels, B)
    if use_cfg:
        cond = torch.cat([cond, model.embed_condition(None, B).to(cond.dtype)])
    prev = model.z_proj_ln(cond + model.pos_embed[0, 0]).unsqueeze(1)
    caches = model.new_caches(prev.shape[0], device)
    tokens_gen = torch.empty(B, N, dtype=torch.long, device=device)

    for k, g in enumerate(sched.group_sizes):
        start, kv_len, first, last = sched.step(k)
        q = queries[:, first:last]
        if use_cfg:
            q = torch.cat([q, q])
        x = torch.cat([prev, q.to(prev.dtype)], dim=1)
        out = model.forward_cached(x, caches, start, kv_len, sched.masks[k], g)
        if on_step is not None:
            on_step(out)
        chosen = choose(out, first, last)
        tokens_gen[:, first:last] = chosen
        if k + 1 < len(sched.group_sizes):
            prev = model.z_proj_ln(model.token_emb(chosen) + pos[:, first:last])
            if use_cfg:
                prev = torch.cat([prev, prev])
    return tokens_gen


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
) -> torch.Tensor:
    """Generate ``[B, N]`` token indices in raster order with ``len(group_sizes)`` forward passes.

    ``labels`` ``[B]`` class indices, or ``None`` for unconditional samples (``fake_latent``; needs
    ``cfg == 1``).  ``orders`` ``[B, N]``: raster positions in generation order.  CFG runs the
    conditional and unconditional branches as one doubled batch; ``cfg_schedule='linear'`` gives
    the ``j``-th generated token the scale ``1 + (cfg - 1) j / N``.  ``generator``: one
    ``torch.Generator`` for the batch, or a list with one per image (then image ``i`` depends only
    on its own generator).  Run under ``torch.autocast`` for bf16.
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
            logits = u + cfg_scales(cfg, cfg_schedule, first, last, N, device) * (c - u)
        else:
            logits = out.float()
        if greedy:
            return logits.argmax(-1)
        g = last - first
        flat = filter_and_sample(logits.reshape(B * g, -1), uniforms[:, first:last].reshape(-1), temperature, top_k, top_p)
        return flat.view(B, g)

    with _eval_mode(model):
        tokens_gen = _decode(model, labels, orders, sizes, cfg, choose)
    tokens = torch.empty_like(tokens_gen)
    tokens.scatter_(1, orders, tokens_gen)
    return tokens


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
