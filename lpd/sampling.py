"""KV-cached parallel decoding (one forward pass per group of tokens) and the sampling settings.

The cache layout and the draw are in docs/design.md; nothing in the loop waits on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lpd.devices import warn_if_emulated_bf16
from lpd.models.lpd import LPD
from lpd.schedules import validate_group_sizes

__all__ = ["SamplingConfig", "ORDERS", "derive_seed", "add_sampling_args", "sampling_from_args", "sample_tokens",
           "teacher_forced_logits", "step_plan", "StepPlan", "cfg_scales", "filter_and_sample", "compiled_step"]

ORDERS = ("lpd", "random", "raster")
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled; every entry point and loop takes one of these."""

    cfg: float = 1.0  # classifier-free guidance scale (1: off)
    cfg_schedule: str = "linear"  # linear: token j in generation order gets 1 + (cfg - 1) j / N; constant: cfg
    temperature: float = 1.0
    top_k: int = 0  # 0: off; keeps every logit equal to the k-th
    top_p: float = 1.0  # 1: off; keeps a token whose preceding mass is <= top_p
    order: str = "lpd"  # lpd, random or raster
    proximity_threshold: float = 1.0
    repulsion_threshold: float = 1.0
    bf16: bool = False  # bf16 autocast for the transformer and the VQ decoder
    decode_fp32: bool = False  # with bf16: decode the VQ in float32

    def __post_init__(self) -> None:
        for name in ("cfg", "temperature", "top_p", "proximity_threshold", "repulsion_threshold"):
            v, nucleus = getattr(self, name), name == "top_p"  # top_p in (0, 1], the others >= 0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or nucleus and not 0 < v <= 1:
                raise ValueError(f"--{name} must be a finite number {'>' if nucleus else '>='} 0.0"
                                 f"{' and <= 1.0' if nucleus else ''}, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"--top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"--cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {list(ORDERS)}, got {self.order!r}")
        for name in ("bf16", "decode_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{name} must be true or false, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with ``changes`` (unknown names are an error)."""
        if unknown := sorted(set(changes) - {f.name for f in dataclasses.fields(self)}):
            raise TypeError(f"unknown sampling settings {unknown}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HELP = {"cfg": "classifier-free guidance scale (1.0: none)", "cfg_schedule": "linear or constant",
         "temperature": "sampling temperature", "top_k": "keep the k most likely tokens (0: off)",
         "top_p": "nucleus sampling mass (1.0: off)", "order": "generation order",
         "proximity_threshold": "tau_p of the locality-aware order",
         "repulsion_threshold": "tau_r: 2 for the released 256 px settings, 3 for XXL-256, 4 at 512 px",
         "bf16": "bf16 autocast for the transformer and the VQ decoder (--no-bf16: float32)",
         "decode_fp32": "with --bf16, decode the VQ in float32 (the released code decodes in bf16)"}


def add_sampling_args(parser: argparse.ArgumentParser, defaults: SamplingConfig | dict = SamplingConfig(),
                      exclude: Sequence[str] = ()) -> None:
    """The flags of :class:`SamplingConfig`; ``defaults``: a config, or changes to the defaults (None: decided later)."""
    base = SamplingConfig()
    values = defaults.to_dict() if isinstance(defaults, SamplingConfig) else {**base.to_dict(), **defaults}
    g = parser.add_argument_group("sampling")
    for f in dataclasses.fields(SamplingConfig):
        if f.name in exclude:
            continue
        kind, value, name = type(getattr(base, f.name)), values[f.name], f"--{f.name}"
        if kind is bool:
            g.add_argument(name, action=argparse.BooleanOptionalAction, default=value, help=_HELP[f.name])
        elif f.name in ("cfg_schedule", "order"):
            g.add_argument(name, default=value, choices=list(ORDERS) if f.name == "order" else ["linear", "constant"],
                           help=_HELP[f.name])
        else:
            g.add_argument(name, type=kind, default=value, help=_HELP[f.name])


def sampling_from_args(args: argparse.Namespace | dict, **changes: Any) -> SamplingConfig:
    """The :class:`SamplingConfig` of parsed flags (names that are not flags keep their defaults)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return SamplingConfig(**{**{k: v for k, v in values.items() if k in SamplingConfig.__dataclass_fields__}, **changes})


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``(seed, *keys)`` (non-negative integers)."""
    words = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@dataclass(frozen=True)
class StepPlan:
    """Per step: the slots its rows write, its mask ``[rows, visible slots]``, its real-token rows and the
    generation indices ``[first, last)`` of its queries; static plans pad every step (a scratch slot)."""

    pos: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    n_prev: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    pads: tuple[int, ...]
    slots: int
    num_out: int  # head rows per step (static: the largest group)


_PLANS: dict[tuple, StepPlan] = {}


def step_plan(group_sizes: Sequence[int], n_context: int, device: torch.device | str, *,
              fused: bool = True, static: bool = False) -> StepPlan:
    """The (cached) plan of decoding ``group_sizes`` after ``n_context`` context slots (condition + known tokens);
    ``fused``: step 0 also feeds the condition row, otherwise the context was prefilled."""
    key = (tuple(group_sizes), n_context, str(device), fused, static)
    if key in _PLANS:
        return _PLANS[key]
    if fused and n_context != 1:
        raise ValueError("only the condition alone can be fed with the first step; prefill longer contexts")
    bounds = np.cumsum([n_context, *group_sizes]).tolist()  # S_0 .. S_K
    spans = [(bounds[k] - n_context, bounds[k + 1] - n_context) for k in range(len(group_sizes))]
    starts = [0 if fused else n_context] + bounds[:-2]
    rows = max(bounds[k + 1] - starts[k] for k in range(len(group_sizes)))
    scratch = bounds[-1]
    steps = []
    for k in range(len(group_sizes)):
        start, end, prev = starts[k], bounds[k + 1], bounds[k] - starts[k]
        width, pad = (scratch + 1, rows - (end - start)) if static else (end, 0)
        p = torch.full((pad + end - start,), scratch, dtype=torch.long)
        p[pad:] = torch.arange(start, end)
        m = torch.zeros(pad + end - start, width, dtype=torch.bool)
        m[:pad, 0] = True  # padding rows see the condition only, so they stay finite
        m[pad : pad + prev, : bounds[k]] = True  # real tokens: up to the end of their own group
        m[pad + prev :, :end] = True  # queries: everything before and their own group
        steps.append((p.to(device), m.to(device), prev, pad))
    pos, masks, n_prev, pads = zip(*steps)
    _PLANS[key] = StepPlan(pos, masks, n_prev, tuple(spans), pads, scratch + int(static), max(group_sizes) if static else 0)
    return _PLANS[key]


def cfg_scales(cfg: float, schedule: str, first: int, last: int, num_tokens: int, device: torch.device) -> torch.Tensor | float:
    """Guidance scale of the tokens ``first..last-1`` in generation order: ``[g, 1]`` or a float."""
    if schedule == "constant":
        return cfg
    j = torch.arange(first, last, device=device, dtype=torch.float32)
    return (1.0 + (cfg - 1.0) * j / num_tokens)[:, None]


def filter_and_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of ``logits [M, V]`` from the tempered, top-k, top-p distribution (as released):
    the first token whose cumulative probability exceeds ``uniforms [M]`` times the kept mass."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-5)
    idx = None
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], -math.inf)
    if top_p < 1.0:
        logits, idx = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = probs * ((probs.cumsum(-1) - probs) <= top_p)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:], right=True)
    # Rounding can put the target at the total (pick == V): take the last token with positive probability.
    # On the CPU only the rare rows that need it pay for the guard; elsewhere every row does, so nothing waits.
    if pick.device.type != "cpu" or bool((pick >= probs.shape[-1]).any()):
        pick = torch.minimum(pick, (probs > 0).cumsum(-1).argmax(-1, keepdim=True))
    return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)


def _uniforms(generator: Generators, batch: int, n: int, device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return torch.rand(batch, n, generator=generator, device=dev).to(device)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}; pass one per image or a single one")
    return torch.stack([torch.rand(n, generator=g, device=g.device).to(device) for g in gens])


Step = Callable[[torch.Tensor, torch.nn.ModuleList, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _decode(model: LPD, labels: torch.Tensor | None, orders: torch.Tensor, group_sizes: Sequence[int], cfg: float,
            choose: Callable[[torch.Tensor, int, int], torch.Tensor], *, context: tuple | None = None,
            on_step: Callable[[torch.Tensor], None] | None = None, step: Step | None = None) -> torch.Tensor:
    """Decode ``orders [B, n]`` in ``group_sizes`` steps, ``choose(head_out, first, last)`` giving a step's ``[B, g]``
    tokens; ``context``: known ``(tokens [B, M], positions [B, M], mask [1 + M, 1 + M])`` to prefill."""
    device, (B, n) = model.pos_embed.device, orders.shape
    copies = 1 if cfg == 1.0 else 2  # CFG: [conditional; unconditional] halves of one batch
    cond = model.embed_condition(labels, B)
    if copies == 2:
        cond = torch.cat([cond, model.embed_condition(None, B).to(cond.dtype)])
    queries = model.embed_queries(orders)
    tokens, positions, ctx_mask = context if context is not None else (orders[:, :0], orders[:, :0], None)
    ctx_rows = model.embed_context(cond, tokens.repeat(copies, 1), positions.repeat(copies, 1))
    n_context = ctx_rows.shape[1]
    plan = step_plan(group_sizes, n_context, device, fused=context is None, static=step is not None)
    kv_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if step is None:
        cache = model.new_cache(copies * B, plan.slots, kv_dtype)
        step, rows = model.decode_step, max(m.shape[0] for m in plan.masks)
    else:  # the same cache tensors as the last call of this shape: CUDA graphs replay on fixed addresses
        key = (copies * B, plan.slots, kv_dtype, device, model.config.depth, model.config.num_heads, model.config.embed_dim)
        if _STATIC_CACHE.get("key") != key:
            _STATIC_CACHE.clear()
            _STATIC_CACHE.update(key=key, cache=model.new_cache(*key[:3]))
            for t in _STATIC_CACHE["cache"].buffers():
                torch._dynamo.mark_static_address(t)
        cache, rows = _STATIC_CACHE["cache"], plan.masks[0].shape[0]
        for t in cache.buffers():
            t.zero_()
    if context is not None:
        model.prefill(ctx_rows, cache, torch.arange(n_context, device=device), ctx_mask.to(device))
    buffer = torch.zeros(copies * B * rows * queries.shape[-1], dtype=queries.dtype, device=device)
    tokens_gen = torch.empty(B, n, dtype=torch.long, device=device)
    prev: torch.Tensor | None = None
    for k, (first, last) in enumerate(plan.spans):
        x = buffer[: plan.masks[k].shape[0] * copies * B * queries.shape[-1]].view(copies * B, -1, queries.shape[-1])
        halves = x.view(copies, B, x.shape[1], -1)  # both CFG halves get the same rows
        off, n_prev = plan.pads[k], plan.n_prev[k]
        if k == 0 and context is None:
            x[:, off : off + 1] = ctx_rows
        elif n_prev:
            halves[:, :, off : off + n_prev] = prev
        halves[:, :, off + n_prev :] = queries[:, first:last]
        out = step(x, cache, plan.pos[k], plan.masks[k], plan.num_out or last - first)
        out = out[:, out.shape[1] - (last - first) :]
        if on_step is not None:
            on_step(out)
        tokens_gen[:, first:last] = chosen = choose(out, first, last)
        if k + 1 < len(plan.spans):
            prev = model.embed_context(None, chosen, orders[:, first:last])
    return tokens_gen


_COMPILED: dict[str, tuple[Callable[..., torch.Tensor], dict[str, bool]]] = {}
_STATIC_CACHE: dict[str, Any] = {}  # the compiled path's KV cache, kept for the next call of the same shape


def _static_step(model: LPD, x: torch.Tensor, cache: torch.nn.ModuleList, pos: torch.Tensor, mask: torch.Tensor, num_out: int) -> torch.Tensor:
    return model.decode_step(x, cache, pos, mask, num_out)


def compiled_step(model: LPD, compile: bool | str | dict = True) -> Step:
    """:meth:`LPD.decode_step` under ``torch.compile`` (``True``, a mode such as ``"reduce-overhead"``
    for CUDA graphs, or a dict of options); falls back to eager with one warning if compiling fails."""
    if not (compile is True or isinstance(compile, (str, dict))):
        raise ValueError(f"compile must be False, True, a torch.compile mode or a dict of torch.compile options, got {compile!r}")
    options: dict[str, Any] = {"mode": compile} if isinstance(compile, str) else dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("dynamic", False)
    key = repr(sorted(options.items()))
    if key not in _COMPILED:  # one compiled function per option set; it holds no model
        _COMPILED[key] = (torch.compile(_static_step, **options), {"failed": False})
        # one graph per architecture, batch and schedule: more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fn, state = _COMPILED[key]
    shape = (tuple(model.pos_embed.shape), model.config.depth)

    def step(x: torch.Tensor, cache: torch.nn.ModuleList, pos: torch.Tensor, mask: torch.Tensor, num_out: int) -> torch.Tensor:
        if not state.get((shape, tuple(x.shape), x.dtype)):
            try:
                return fn(model, x, cache, pos, mask, num_out)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                state[(shape, tuple(x.shape), x.dtype)] = state["failed"] = True
                warnings.warn(f"torch.compile of the decoding step {list(x.shape)} failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); decoding eagerly with static shapes instead (same tokens, no speed-up)",
                              RuntimeWarning, stacklevel=3)
        return model.decode_step(x, cache, pos, mask, num_out)
    step.fallback = state  # type: ignore[attr-defined]
    return step


def _inputs(model: LPD, labels: Any, orders: Any, group_sizes: Sequence[int], n: int | None = None) -> tuple:
    """Labels and orders as tensors on the model's device, checked; the group sizes as a list."""
    device, N = model.pos_embed.device, model.num_tokens
    # checked where the inputs are (on the host, usually), so that nothing waits on the device
    orders = torch.as_tensor(np.asarray(orders) if not isinstance(orders, torch.Tensor) else orders).long()
    n = N if n is None else n
    if orders.dim() != 2 or orders.shape[1] != n:
        raise ValueError(f"orders must have shape [B, {n}] for this model's {model.grid_size}x{model.grid_size} grid, got {list(orders.shape)}")
    if n == N and not torch.equal(orders.sort(dim=1).values, torch.arange(N, device=orders.device).expand_as(orders)):
        bad = int((orders.sort(dim=1).values != torch.arange(N, device=orders.device)).any(1).nonzero()[0])
        raise ValueError(f"orders row {bad} is not a permutation of 0..{N - 1}")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.is_floating_point() or labels.shape != (orders.shape[0],):
            raise ValueError(f"labels must be {orders.shape[0]} integers (one per order), got {labels.dtype} {list(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= model.class_num):
            raise ValueError(f"labels must be in 0..{model.class_num - 1}")
        labels = labels.to(device).long()
    return labels, orders.to(device), validate_group_sizes(group_sizes, n)


@contextlib.contextmanager
def _inference(model: LPD, autocast_dtype: torch.dtype | None):
    was_training, device = model.training, model.pos_embed.device
    model.eval()
    warn_if_emulated_bf16(device, autocast_dtype)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), amp:
            yield
    finally:
        model.train(was_training)


def _chooser(B: int, N: int, sampling: SamplingConfig, greedy: bool, uniforms: torch.Tensor | None, device: torch.device):
    """``choose(head_out, first, last)``: guided logits, then argmax or a filtered draw."""
    def choose(out: torch.Tensor, first: int, last: int) -> torch.Tensor:
        logits = out.float()
        if sampling.cfg != 1.0:
            c, u = logits[:B], logits[B:]
            logits = (c - u).mul_(cfg_scales(sampling.cfg, sampling.cfg_schedule, first, last, N, device)).add_(u)
        if greedy:
            return logits.argmax(-1)
        return filter_and_sample(logits.flatten(0, 1), uniforms[:, first:last].reshape(-1),
                                 sampling.temperature, sampling.top_k, sampling.top_p).view(B, -1)
    return choose


def sample_tokens(model: LPD, labels: torch.Tensor | None, orders: torch.Tensor | np.ndarray, group_sizes: Sequence[int],
                  sampling: SamplingConfig | None = None, *, greedy: bool = False, generator: Generators = None,
                  compile: bool | str | dict = False, autocast_dtype: torch.dtype | None = None, **settings: Any) -> torch.Tensor:
    """``[B, N]`` raster tokens of ``labels [B]`` (None: unconditional) in ``len(group_sizes)`` passes over ``orders [B, N]``
    (raster positions in generation order); one ``generator`` or one per image; ``compile``: static-shape steps."""
    sampling = (sampling or SamplingConfig()).replace(**settings)
    labels, orders, sizes = _inputs(model, labels, orders, group_sizes)
    if labels is None and sampling.cfg != 1.0:
        raise ValueError("classifier-free guidance needs labels; use cfg=1.0 for unconditional sampling")
    (B, N), device = orders.shape, orders.device
    uniforms = None if greedy else _uniforms(generator, B, N, device)
    step = compiled_step(model, compile) if compile is not False else None
    with _inference(model, autocast_dtype or (torch.bfloat16 if sampling.bf16 else None)):
        tokens_gen = _decode(model, labels, orders, sizes, sampling.cfg, _chooser(B, N, sampling, greedy, uniforms, device), step=step)
    return torch.empty_like(tokens_gen).scatter_(1, orders, tokens_gen)


def teacher_forced_logits(model: LPD, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor | np.ndarray,
                          group_sizes: Sequence[int], cfg: float = 1.0, context: tuple | None = None) -> torch.Tensor:
    """Head outputs of cached decoding fed the raster ``tokens``: ``[B, n, V]`` in generation order (``[2B, n,
    V]``, conditional rows first, when ``cfg != 1``); :meth:`LPD.logits` up to float error."""
    labels, orders, sizes = _inputs(model, labels, orders, group_sizes, None if context is None else orders.shape[1])
    tokens_gen = torch.gather(torch.as_tensor(tokens, device=orders.device).long().reshape(orders.shape[0], -1), 1, orders)
    outs: list[torch.Tensor] = []
    with _inference(model, None):
        _decode(model, labels, orders, sizes, cfg, lambda out, a, b: tokens_gen[:, a:b], context=context, on_step=outs.append)
    return torch.cat(outs, dim=1)
