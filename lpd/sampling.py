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
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lpd.devices import warn_if_emulated_bf16
from lpd.models.lpd import LPD, Rows, attends
from lpd.schedules import validate_group_sizes

__all__ = ["SamplingConfig", "ORDERS", "derive_seed", "add_sampling_args", "sampling_from_args", "Decoder", "DecodeStep",
           "sample_tokens", "teacher_forced_logits", "step_plan", "StepPlan", "cfg_scales", "filter_and_sample"]

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
    """The forward passes of a decode: the prefill (first, when ``prefill``), then one per step. Each
    writes slots ``pos`` and attends through ``masks`` (``[rows, visible slots]``; ``rows`` and ``keys``:
    their :func:`attends` descriptors), its first ``pads`` rows padding (static plans: they write a scratch
    slot), then ``n_ctx`` context rows, then queries; ``spans``: the decoded indices ``[first, last)``."""

    pos: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    rows: tuple[Rows, ...]
    keys: tuple[Rows, ...]
    pads: tuple[int, ...]
    n_ctx: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    prefill: int
    slots: int
    num_out: int  # head rows per step (static: the largest group)


def step_plan(group_sizes: Sequence[int], n_prefix: int, device: torch.device | str, *, n_known: int = 0,
              static: bool = False) -> StepPlan:
    """The plan of decoding ``group_sizes`` after ``n_prefix`` prefix rows, the first ``n_known`` groups
    known; slots: the prefix, then group after group (+ a scratch slot when ``static``). The context
    (prefix and known groups) is fed with the first step, or prefilled alone when a static plan would
    pad every step to its length."""
    K, bounds = len(group_sizes), np.cumsum([n_prefix, *group_sizes]).tolist()  # group g: [S_g, S_g+1)
    scratch, ctx = bounds[-1], bounds[n_known]
    slot = torch.arange(scratch + 1)
    ctx_group = torch.repeat_interleave(torch.arange(K + 2), torch.tensor([n_prefix, *group_sizes, 1]))
    prefill = static and ctx > 1
    starts = [ctx if prefill else 0] + bounds[n_known : K - 1]  # step k's rows: [start, S_k+1)
    steps = [(s, bounds[k + 1], k) for k, s in zip(range(n_known, K), starts)]
    rows = max(end - start for start, end, _ in steps)
    plan: list[tuple] = []
    for i, (start, end, k) in enumerate([(0, ctx, n_known)] * prefill + steps):
        pad, width = (rows - end + start, scratch + 1) if static and i >= prefill else (0, end)
        query = (slot[:width] >= bounds[k]) & (slot[:width] < bounds[k + 1])
        keys = (slot[:width], torch.where(query, k, ctx_group[:width]), query)
        pos = torch.cat([torch.full((pad,), scratch), torch.arange(start, end)])
        row = (pos, torch.where(torch.arange(len(pos)) < pad, -1, keys[1][pos]), query[pos])
        row = tuple(t[:, None].to(device) for t in row)
        keys = tuple(t.to(device) for t in keys)
        plan.append((row[0][:, 0], attends(row, keys), row, keys, pad, bounds[k] - start))
    pos, masks, row_ids, key_ids, pads, n_ctx = zip(*plan)
    spans = tuple((bounds[k] - ctx, bounds[k + 1] - ctx) for k in range(n_known, K))
    return StepPlan(pos, masks, row_ids, key_ids, pads, n_ctx, spans, int(prefill), scratch + int(static),
                    max(group_sizes[n_known:]) if static else 0)


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


class DecodeStep(NamedTuple):
    """After a step: the head outputs ``logits [cB, g, V]`` of the decoded tokens ``first..last-1`` and
    the tokens ``[B, n]`` decoded so far (generation order, filled up to ``last``)."""

    first: int
    last: int
    logits: torch.Tensor
    tokens: torch.Tensor


class Decoder:
    """KV-cached parallel decoding of one model under one :class:`SamplingConfig`: it owns the step
    plans, the KV cache, the (compiled) step and the draw; reuse it for repeated calls. Guidance
    (``cfg != 1``) doubles the batch: a prefix is ``[cB, L, D]`` condition rows, the conditional ones
    first (:meth:`class_prefix`). ``compile``: static-shape steps under ``torch.compile`` (``True``, a
    mode such as ``"reduce-overhead"`` for CUDA graphs, or a dict of options); a failing compiler falls
    back to eager steps with one warning."""

    def __init__(self, model: LPD, sampling: SamplingConfig | None = None, *, greedy: bool = False,
                 compile: bool | str | dict = False, autocast_dtype: torch.dtype | None = None):
        if not (compile is False or compile is True or isinstance(compile, (str, dict))):
            raise ValueError(f"compile must be False, True, a torch.compile mode or a dict of torch.compile "
                             f"options, got {compile!r}")
        self.model, self.sampling, self.greedy = model, sampling or SamplingConfig(), greedy
        self.guided = self.sampling.cfg != 1.0
        self.autocast_dtype = autocast_dtype or (torch.bfloat16 if self.sampling.bf16 else None)
        self.compiled, self.compile_failed = None, False
        if compile is not False:
            opts = {"mode": compile} if isinstance(compile, str) else compile if isinstance(compile, dict) else {}
            self.compiled = torch.compile(type(model).decode_step, **{"dynamic": False, **opts})
            # one graph per architecture, batch and schedule: more than dynamo's default of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._plans: dict[tuple, StepPlan] = {}
        self._cache: tuple[tuple, torch.nn.ModuleList] | None = None  # static: fixed addresses for CUDA graphs

    def class_prefix(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Condition rows ``[cB, 1, D]`` of class ``labels [B]`` (None: unconditional)."""
        with torch.no_grad():
            rows = self.model.embed_condition(labels, batch)
            return torch.cat([rows, self.model.embed_condition(None, batch).to(rows.dtype)]) if self.guided else rows

    def sample(self, labels: Any, orders: Any, group_sizes: Sequence[int], generator: Generators = None) -> torch.Tensor:
        """``[B, N]`` raster tokens of ``labels [B]`` (None: unconditional) in ``len(group_sizes)`` steps over
        ``orders [B, N]`` (raster positions in generation order); one ``generator`` or one per image."""
        labels, orders, sizes = _inputs(self.model, labels, orders, group_sizes)
        if labels is None and self.guided:
            raise ValueError("classifier-free guidance needs labels; use cfg=1.0 for unconditional sampling")
        tokens = self.decode(self.class_prefix(labels, orders.shape[0]), orders, sizes, generator=generator)
        return torch.empty_like(tokens).scatter_(1, orders, tokens)

    def logits(self, prefix: torch.Tensor, orders: torch.Tensor, group_sizes: Sequence[int], tokens: torch.Tensor,
               *, n_known: int = 0, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head outputs ``[cB, N - n_known, V]`` of decoding fed ``tokens [B, N]`` (generation order; the first
        ``n_known`` known): :meth:`LPD.logits` up to float error."""
        known = tokens[:, :n_known] if n_known else None
        steps = self.steps(prefix, orders, group_sizes, prefix_mask=prefix_mask, known=known, forced=tokens[:, n_known:])
        return torch.cat([s.logits for s in steps], dim=1)

    def decode(self, prefix: torch.Tensor, orders: torch.Tensor, group_sizes: Sequence[int], **options: Any) -> torch.Tensor:
        """:meth:`steps` to the end: the decoded tokens ``[B, n]`` in generation order."""
        for step in self.steps(prefix, orders, group_sizes, **options):
            pass
        return step.tokens

    def steps(self, prefix: torch.Tensor, orders: torch.Tensor, group_sizes: Sequence[int], *,
              prefix_mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
              generator: Generators = None, forced: torch.Tensor | None = None) -> Iterator[DecodeStep]:
        """Decode ``orders [B, N]`` in ``group_sizes`` after the ``prefix`` rows (``prefix_mask [cB, L]``: False =
        padding) and the ``known [B, M]`` tokens of the first whole groups, in one forward with the first step;
        a :class:`DecodeStep` after every step. ``forced [B, N - M]``: fed instead of drawn (teacher forcing).
        Inputs are trusted (on the model's device); nothing waits on the device."""
        m, (B, N), device = self.model, orders.shape, orders.device
        M, c, D = 0 if known is None else known.shape[1], 2 if self.guided else 1, m.config.embed_dim
        plan = self._plan(tuple(group_sizes), prefix.shape[1], np.cumsum(group_sizes).tolist().index(M) + 1 if M else 0, device)
        draws = None if forced is not None or self.greedy else _uniforms(generator, B, N - M, device)
        masks = plan.masks if prefix_mask is None else [
            attends(r, k, F.pad(prefix_mask, (0, plan.slots - prefix.shape[1]), value=True)[:, None, None, : k[0].numel()])
            for r, k in zip(plan.rows, plan.keys)]
        was_training = m.training
        m.eval()
        warn_if_emulated_bf16(device, self.autocast_dtype)
        try:
            with torch.no_grad(), self._amp():
                ctx = m.embed_prefix(prefix)
                if M:
                    ctx = torch.cat([ctx, m.embed_tokens(known, orders[:, :M]).repeat(c, 1, 1)], dim=1)
                queries, cache = m.embed_queries(orders[:, M:]), self._kv_cache(c * B, plan.slots)
                if plan.prefill:
                    m.decode_step(ctx, cache, plan.pos[0], masks[0], 1)
                buffer = torch.zeros(c * B * max(p.numel() for p in plan.pos) * D, dtype=queries.dtype, device=device)
                tokens = torch.empty(B, N - M, dtype=torch.long, device=device)
            for k, (first, last) in enumerate(plan.spans):
                i = k + plan.prefill
                with torch.no_grad(), self._amp():
                    x = buffer[: c * B * plan.pos[i].numel() * D].view(c * B, -1, D)
                    halves, off, n_ctx = x.view(c, B, -1, D), plan.pads[i], plan.n_ctx[i]  # CFG: the same rows
                    if n_ctx:
                        (x if k == 0 else halves)[..., off : off + n_ctx, :] = ctx if k == 0 else prev
                    halves[:, :, off + n_ctx :] = queries[:, first:last]
                    out = self._step(x, cache, plan.pos[i], masks[i], plan.num_out or last - first)
                    out = out[:, out.shape[1] - (last - first) :]
                    chosen = forced[:, first:last] if forced is not None else self._draw(out, first, last, N - M, draws)
                    tokens[:, first:last] = chosen
                    if last < N - M:
                        prev = m.embed_tokens(chosen, orders[:, M + first : M + last])
                yield DecodeStep(first, last, out, tokens)
        finally:
            m.train(was_training)

    def _draw(self, out: torch.Tensor, first: int, last: int, n: int, draws: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``[B, g]`` of head outputs ``[cB, g, V]``: guided logits, then argmax or a filtered draw."""
        logits, s = out.float(), self.sampling
        if self.guided:
            c, u = logits.chunk(2)
            logits = (c - u).mul_(cfg_scales(s.cfg, s.cfg_schedule, first, last, n, out.device)).add_(u)
        if draws is None:
            return logits.argmax(-1)
        picks = filter_and_sample(logits.flatten(0, 1), draws[:, first:last].reshape(-1), s.temperature, s.top_k, s.top_p)
        return picks.view(logits.shape[0], -1)

    def _plan(self, sizes: tuple[int, ...], n_prefix: int, n_known: int, device: torch.device) -> StepPlan:
        key = (sizes, n_prefix, n_known, str(device))
        if key not in self._plans:
            self._plans[key] = step_plan(sizes, n_prefix, device, n_known=n_known, static=self.compiled is not None)
        return self._plans[key]

    def _amp(self) -> contextlib.AbstractContextManager:
        dtype, device = self.autocast_dtype, self.model.pos_embed.device
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _kv_cache(self, batch: int, slots: int) -> torch.nn.ModuleList:
        """A new KV cache; static steps reuse theirs while the shape holds (CUDA graphs replay on its addresses)."""
        m, device = self.model, self.model.pos_embed.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        if self.compiled is None:
            return m.new_cache(batch, slots, dtype)
        key = (batch, slots, dtype, m.pos_embed.dtype, device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, m.new_cache(batch, slots, dtype))
            for t in self._cache[1].buffers():
                torch._dynamo.mark_static_address(t)
        for t in self._cache[1].buffers():
            t.zero_()
        return self._cache[1]

    def _step(self, x: torch.Tensor, cache: torch.nn.ModuleList, pos: torch.Tensor, mask: torch.Tensor,
              num_out: int) -> torch.Tensor:
        if self.compiled is not None and not self.compile_failed:
            try:
                return self.compiled(self.model, x, cache, pos, mask, num_out)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compile_failed = True
                warnings.warn(f"torch.compile of the decoding step {list(x.shape)} failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); decoding eagerly with static shapes instead (same tokens, no "
                              f"speed-up)", RuntimeWarning, stacklevel=4)
        return self.model.decode_step(x, cache, pos, mask, num_out)


def _uniforms(generator: Generators, batch: int, n: int, device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return torch.rand(batch, n, generator=generator, device=dev).to(device)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}; pass one per image or a single one")
    return torch.stack([torch.rand(n, generator=g, device=g.device).to(device) for g in gens])


def _inputs(model: LPD, labels: Any, orders: Any, group_sizes: Sequence[int]) -> tuple:
    """Labels and orders as tensors on the model's device, checked; the group sizes as a list."""
    device, N = model.pos_embed.device, model.num_tokens
    # checked where the inputs are (on the host, usually), so that nothing waits on the device
    orders = torch.as_tensor(np.asarray(orders) if not isinstance(orders, torch.Tensor) else orders).long()
    if orders.dim() != 2 or orders.shape[1] != N:
        raise ValueError(f"orders must have shape [B, {N}] for this model's {model.grid_size}x{model.grid_size} grid, got {list(orders.shape)}")
    if not torch.equal(orders.sort(dim=1).values, torch.arange(N, device=orders.device).expand_as(orders)):
        bad = int((orders.sort(dim=1).values != torch.arange(N, device=orders.device)).any(1).nonzero()[0])
        raise ValueError(f"orders row {bad} is not a permutation of 0..{N - 1}")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.is_floating_point() or labels.shape != (orders.shape[0],):
            raise ValueError(f"labels must be {orders.shape[0]} integers (one per order), got {labels.dtype} {list(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= model.class_num):
            raise ValueError(f"labels must be in 0..{model.class_num - 1}")
        labels = labels.to(device).long()
    return labels, orders.to(device), validate_group_sizes(group_sizes, N)


def sample_tokens(model: LPD, labels: torch.Tensor | None, orders: torch.Tensor | np.ndarray, group_sizes: Sequence[int],
                  sampling: SamplingConfig | None = None, *, greedy: bool = False, generator: Generators = None,
                  compile: bool | str | dict = False, autocast_dtype: torch.dtype | None = None, **settings: Any) -> torch.Tensor:
    """:meth:`Decoder.sample` with a new :class:`Decoder` (``**settings``: changes to ``sampling``)."""
    sampling = (sampling or SamplingConfig()).replace(**settings)
    decoder = Decoder(model, sampling, greedy=greedy, compile=compile, autocast_dtype=autocast_dtype)
    return decoder.sample(labels, orders, group_sizes, generator)


def teacher_forced_logits(model: LPD, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor | np.ndarray,
                          group_sizes: Sequence[int], cfg: float = 1.0) -> torch.Tensor:
    """Head outputs of cached decoding fed the raster ``tokens``: ``[B, N, V]`` in generation order (``[2B, N,
    V]``, conditional rows first, when ``cfg != 1``); :meth:`LPD.logits` up to float error."""
    labels, orders, sizes = _inputs(model, labels, orders, group_sizes)
    decoder = Decoder(model, SamplingConfig(cfg=cfg))
    forced = torch.gather(torch.as_tensor(tokens, device=orders.device).long().reshape(orders.shape[0], -1), 1, orders)
    return decoder.logits(decoder.class_prefix(labels, orders.shape[0]), orders, sizes, forced)
