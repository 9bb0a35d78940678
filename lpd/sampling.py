"""KV-cached parallel decoding (one forward pass per group of tokens) and the sampling settings."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lpd.config import ORDERS, check_labels, check_order
from lpd.devices import warn_if_emulated_bf16
from lpd.images import to_uint8
from lpd.models.lpd import LPD, Rows, attends, valid_keys
from lpd.schedules import validate_group_sizes

__all__ = ["SamplingConfig", "Decoder", "sample_tokens", "teacher_forced_logits"]
__all__ += ["add_sampling_args", "sampling_from_args"]

Generators = torch.Generator | Sequence[torch.Generator] | None
Sizes = Sequence[int]  # group sizes
CFG_SCHEDULES = ("linear", "constant")  # guidance: token j of N gets 1 + (cfg - 1) j / N, or cfg


@dataclass(frozen=True)
class SamplingConfig:
    """How images are sampled; every entry point and loop takes one of these."""

    cfg: float = 1.0  # classifier-free guidance scale (1: off)
    cfg_schedule: str = "linear"  # one of CFG_SCHEDULES
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
            number = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not number or v < 0 or nucleus and not 0 < v <= 1:
                bound = "> 0.0 and <= 1.0" if nucleus else ">= 0.0"
                raise ValueError(f"--{name} must be a finite number {bound}, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"--top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if (schedule := self.cfg_schedule) not in CFG_SCHEDULES:
            raise ValueError(f"--cfg_schedule must be 'linear' or 'constant', got {schedule!r}")
        check_order(self.order)
        for name in ("bf16", "decode_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{name} must be true or false, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with ``changes`` (unknown names are an error)."""
        if unknown := sorted(set(changes) - set(known := list(self.__dataclass_fields__))):
            raise TypeError(f"unknown sampling settings {unknown}; known: {known}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HELP = {
    "cfg": "classifier-free guidance scale (1.0: none)",
    "cfg_schedule": "linear or constant",
    "temperature": "sampling temperature",
    "top_k": "keep the k most likely tokens (0: off)",
    "top_p": "nucleus sampling mass (1.0: off)",
    "order": "generation order",
    "proximity_threshold": "tau_p of the locality-aware order",
    "repulsion_threshold": "tau_r: 2 for the released 256 px settings, 3 for XXL-256, 4 at 512 px",
    "bf16": "bf16 autocast for the transformer and the VQ decoder (--no-bf16: float32)",
    "decode_fp32": "with --bf16, decode the VQ in float32 (the released code decodes in bf16)",
}


def add_sampling_args(
    parser: argparse.ArgumentParser, defaults: SamplingConfig | dict = SamplingConfig(), exclude=()
) -> None:
    """The flags of :class:`SamplingConfig`; ``defaults``: a config, or changes to the defaults
    (None: decided later)."""
    base = SamplingConfig().to_dict()
    values = defaults.to_dict() if isinstance(defaults, SamplingConfig) else {**base, **defaults}
    choices = {"order": list(ORDERS), "cfg_schedule": list(CFG_SCHEDULES)}
    g = parser.add_argument_group("sampling")
    for name in (n for n in base if n not in exclude):
        flag, kw = f"--{name}", dict(default=values[name], help=_HELP[name])
        if type(base[name]) is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif name in choices:
            g.add_argument(flag, choices=choices[name], **kw)
        else:
            g.add_argument(flag, type=type(base[name]), **kw)


def sampling_from_args(args: argparse.Namespace | dict, **changes: Any) -> SamplingConfig:
    """The :class:`SamplingConfig` of parsed flags; settings not among them keep their defaults."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    fields = SamplingConfig.__dataclass_fields__
    return SamplingConfig(**{**{k: v for k, v in values.items() if k in fields}, **changes})


@dataclass(frozen=True)
class StepPlan:
    """The forward passes of a decode (a prefill if ``prefill``, then one per step): each writes
    slots ``pos``, attends through ``masks [rows, slots]`` (:func:`attends` of ``rows``, ``keys``)
    and has ``pads`` rows writing a scratch slot, context rows, then the queries of ``spans``."""

    pos: tuple[Tensor, ...]
    masks: tuple[Tensor, ...]
    rows: tuple[Rows, ...]
    keys: tuple[Rows, ...]
    pads: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    prefill: int
    slots: int
    num_out: int  # head rows per step (static: the largest group)


def step_plan(
    sizes: Sizes, n_prefix: int, device: Any, *, n_known: int = 0, static: bool = False
) -> StepPlan:
    """The plan of decoding groups of ``sizes`` after ``n_prefix`` prefix rows, the first
    ``n_known`` groups known. Slots: the prefix, then group after group (+ a scratch slot if
    ``static``). The context is fed with the first step, or alone before it where a static plan
    would pad every step to its length."""
    # group g: slots [bounds[g], bounds[g + 1]); context groups: the prefix 0, group g g + 1
    K, bounds = len(sizes), np.cumsum([n_prefix, *sizes]).tolist()
    end, ctx, slot = bounds[-1], bounds[n_known], torch.arange(bounds[-1] + 1)
    ctx_group = torch.repeat_interleave(torch.arange(K + 2), torch.tensor([n_prefix, *sizes, 1]))
    prefill = static and ctx > 1
    starts = [ctx if prefill else 0] + bounds[n_known : K - 1]
    fwd = [(a, bounds[k + 1], k) for k, a in enumerate(starts, n_known)]  # step k: rows [a, b)
    height, plan, fwd = max(b - a for a, b, _ in fwd), [], [(0, ctx, n_known)] * prefill + fwd
    for i, (a, b, k) in enumerate(fwd):
        pad, width = (height - b + a, end + 1) if static and i >= prefill else (0, b)
        query = (slot[:width] >= bounds[k]) & (slot[:width] < bounds[k + 1])
        key = (slot[:width], torch.where(query, k, ctx_group[:width]), query)
        pos = torch.cat([torch.full((pad,), end), torch.arange(a, b)])
        row = (pos, torch.where(torch.arange(len(pos)) < pad, -1, key[1][pos]), query[pos])
        row, key = tuple(t[:, None].to(device) for t in row), tuple(t.to(device) for t in key)
        plan.append((row[0][:, 0], attends(row, key), row, key, pad))
    spans = tuple((bounds[k] - ctx, bounds[k + 1] - ctx) for k in range(n_known, K))
    num_out = max(sizes[n_known:]) if static else 0
    return StepPlan(*zip(*plan), spans, int(prefill), end + int(static), num_out)


def cfg_scales(cfg: float, schedule: str, first: int, last: int, n: int, device: Any) -> Any:
    """Guidance scale of the tokens ``first..last-1`` in generation order: ``[g, 1]`` or a float."""
    if schedule == "constant":
        return cfg
    j = torch.arange(first, last, device=device, dtype=torch.float32)
    return (1.0 + (cfg - 1.0) * j / n)[:, None]


def filter_and_sample(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """One token per row of ``logits [M, V]`` from the tempered, top-k, top-p distribution: the
    first token whose cumulative probability exceeds ``uniforms [M]`` times the kept mass."""
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
    # pick == V by rounding: the last token of positive probability (CPU: if needed, else no sync)
    if pick.device.type != "cpu" or bool((pick >= probs.shape[-1]).any()):
        pick = torch.minimum(pick, (probs > 0).cumsum(-1).argmax(-1, keepdim=True))
    return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)


class DecodeStep(NamedTuple):
    """After a step: ``logits [cB, g, V]`` of tokens ``first..last-1``, ``tokens [B, n]`` so far."""

    first: int
    last: int
    logits: Tensor
    tokens: Tensor


class Decoder:
    """KV-cached parallel decoding of a model with a :class:`SamplingConfig` (``greedy``: argmax),
    one call at a time. Guidance (``cfg != 1``) doubles the batch: a prefix is ``[cB, L, D]`` rows,
    the conditional ones first. ``compile`` (``True``, a mode or a dict of options): static-shape
    steps under ``torch.compile``, eager with one warning where it fails."""

    def __init__(
        self,
        model: LPD,
        sampling: SamplingConfig | None = None,
        *,
        greedy: bool = False,
        compile: bool | str | dict = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        if not isinstance(compile, (bool, str, dict)):
            msg = "compile must be a bool, a torch.compile mode or a dict of its options"
            raise ValueError(f"{msg}, got {compile!r}")
        self.model, self.sampling, self.greedy = model, sampling or SamplingConfig(), greedy
        self.guided = self.sampling.cfg != 1.0  # the one reading of cfg: doubles the batch
        self.amp = autocast_dtype or (torch.bfloat16 if self.sampling.bf16 else None)
        self.compiled, self.compile_failed, self._cache = None, False, None
        if compile is not False:
            opts = compile if isinstance(compile, dict) else {}
            opts = {"mode": compile} if isinstance(compile, str) else opts
            self.compiled = torch.compile(type(model).decode_step, **{"dynamic": False, **opts})
            # one graph per architecture, batch and schedule: more than dynamo's default of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @torch.no_grad()
    def class_prefix(self, labels: Tensor | None, batch: int) -> Tensor:
        """Condition rows ``[cB, 1, D]`` of class ``labels [B]`` (None: unconditional)."""
        if self.model.text is not None:
            raise ValueError("a text-conditional model decodes captions: use Decoder.text_prefix")
        rows = self.model.embed_condition(labels, batch)
        null = self.model.embed_condition(None, batch).to(rows.dtype)
        return torch.cat([rows, null]) if self.guided else rows

    @torch.no_grad()
    def text_prefix(
        self, features: Tensor, mask: Tensor | None = None, negative: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Condition rows ``[cB, L, D]`` and ``prefix_mask [cB, L]`` of caption ``features``
        (``mask``: False = padding); with guidance the rows of the null caption follow, or those
        of a ``negative`` prompt (features ``[B or 1, L', text_dim]``, or ``(features, mask)``)."""
        rows, mask = self.model.text_prefix(features, mask)
        if not self.guided:
            if negative is not None:
                raise ValueError("a negative prompt needs guidance: cfg other than 1.0")
            return rows, mask
        B = len(rows)
        negative = negative if isinstance(negative, (tuple, list)) else (negative, None)
        neg, neg_mask = self.model.text_prefix(*negative, batch=B)
        L = max(rows.shape[1], neg.shape[1])
        rows, neg = (F.pad(r, (0, 0, 0, L - r.shape[1])) for r in (rows, neg.expand(B, -1, -1)))
        masks = (F.pad(k, (0, L - k.shape[1]), value=False) for k in (mask, neg_mask.expand(B, -1)))
        return torch.cat([rows, neg.to(rows.dtype)]), torch.cat(list(masks))

    def sample(
        self, labels: Any, orders: Any, sizes: Sizes, generator: Generators = None
    ) -> Tensor:
        """``[B, N]`` raster tokens of ``labels [B]`` (None: unconditional) decoded in groups of
        ``sizes`` over ``orders [B, N]``; one ``generator`` or one per image. Inputs are trusted."""
        device = self.model.pos_embed.device
        orders = torch.as_tensor(orders, device=device).long()
        labels = None if labels is None else torch.as_tensor(labels, device=device).long()
        prefix = self.class_prefix(labels, len(orders))
        tokens = self.decode(prefix, orders, sizes, generator=generator)
        return torch.empty_like(tokens).scatter_(1, orders, tokens)

    def logits(
        self,
        prefix: Tensor,
        orders: Tensor,
        sizes: Sizes,
        tokens: Tensor,
        n_known: int = 0,
        **options: Any,
    ) -> Tensor:
        """Head outputs ``[cB, N - n_known, V]`` of decoding fed ``tokens [B, N]`` (generation
        order, the first ``n_known`` known; ``options``: of :meth:`steps`)."""
        known, forced = (tokens[:, :n_known] if n_known else None), tokens[:, n_known:]
        steps = self.steps(prefix, orders, sizes, known=known, forced=forced, **options)
        return torch.cat([s.logits for s in steps], dim=1)

    def decode(self, prefix: Tensor, orders: Tensor, sizes: Sizes, **options: Any) -> Tensor:
        """:meth:`steps` to the end: the decoded tokens ``[B, n]`` in generation order."""
        return collections.deque(self.steps(prefix, orders, sizes, **options), maxlen=1)[0].tokens

    def steps(
        self,
        prefix: Tensor,
        orders: Tensor,
        sizes: Sizes,
        *,
        prefix_mask: Tensor | None = None,
        known: Tensor | None = None,
        generator: Generators = None,
        forced: Tensor | None = None,
    ) -> Iterator[DecodeStep]:
        """Decode ``orders [B, N]`` in groups of ``sizes`` after the ``prefix`` rows (``prefix_mask
        [cB, L]``: False = padding) and the ``known [B, M]`` tokens of the first groups; yields a
        :class:`DecodeStep` per step. ``forced [B, N - M]``: fed, not drawn. Inputs are trusted."""
        m, (B, N), device = self.model, orders.shape, orders.device
        M = 0 if known is None else known.shape[1]
        c, n, D = 1 + self.guided, N - M, m.config.embed_dim
        n_known = np.cumsum(sizes).tolist().index(M) + 1 if M else 0  # M: whole groups
        key = ("plan", tuple(sizes), prefix.shape[1], n_known, str(device), bool(self.compiled))
        build = functools.partial(step_plan, *key[1:3], device, n_known=n_known, static=key[-1])
        plan = m.cached(key, build)  # on the model, as its training masks
        masks = plan.masks
        if prefix_mask is not None:  # per batch: padded prefix rows are keys for nobody
            valid = valid_keys(prefix_mask, plan.slots)[:, None, None]
            masks = [attends(r, k, valid[..., : len(k[0])]) for r, k in zip(plan.rows, plan.keys)]
        draws = None if forced is not None or self.greedy else _uniforms(generator, B, n, device)
        was_training = m.training
        m.eval()
        warn_if_emulated_bf16(device, self.amp)
        try:
            with torch.no_grad(), self._amp():
                ctx = m.embed_prefix(prefix)
                if M:
                    ctx = torch.cat([ctx, m.embed_tokens(known, orders[:, :M]).repeat(c, 1, 1)], 1)
                queries, cache = m.embed_queries(orders[:, M:]), self._kv_cache(c * B, plan.slots)
                ctx_at = None  # with rope: the rows' raster positions (-1: prefix)
                if m.config.rope:
                    ctx_at = F.pad(orders[:, :M], (prefix.shape[1], 0), value=-1)
                if plan.prefill:
                    at = None if ctx_at is None else ctx_at.repeat(c, 1)
                    m.decode_step(ctx, cache, plan.pos[0], masks[0], 1, at)
                buffer = queries.new_zeros(c * B * max(len(p) for p in plan.pos) * D)
                tokens = torch.empty(B, n, dtype=torch.long, device=device)
            prev = prev_at = None  # the previous step's tokens: context rows of the next
            for k, (first, last) in enumerate(plan.spans):
                i, g = k + plan.prefill, last - first
                with torch.no_grad(), self._amp():
                    x = buffer[: c * B * len(plan.pos[i]) * D].view(c * B, -1, D)
                    a, b, halves = plan.pads[i], x.shape[1] - g, x.view(c, B, -1, D)
                    at = None if ctx_at is None else torch.full(x.shape[:2], -1, device=device)
                    if b > a:  # context rows; the guidance halves share the token rows
                        halves[:, :, a:b] = prev if k else ctx.view(c, B, -1, D)
                        if at is not None:
                            at.view(c, B, -1)[:, :, a:b] = prev_at if k else ctx_at
                    halves[:, :, b:] = queries[:, first:last]
                    if at is not None:
                        at.view(c, B, -1)[:, :, b:] = orders[:, M + first : M + last]
                    num_out = plan.num_out or g
                    out = self._step(x, cache, plan.pos[i], masks[i], num_out, at)[:, -g:]
                    if forced is None:
                        tokens[:, first:last] = chosen = self._draw(out, first, n, draws)
                    else:
                        tokens[:, first:last] = chosen = forced[:, first:last]
                    if last < n:
                        prev_at = orders[:, M + first : M + last]
                        prev = m.embed_tokens(chosen, prev_at)
                yield DecodeStep(first, last, out, tokens)
        finally:
            m.train(was_training)

    def _draw(self, out: Tensor, first: int, n: int, draws: Tensor | None) -> Tensor:
        """Tokens ``[B, g]`` of head outputs ``[cB, g, V]``: guided logits, argmax or a draw."""
        logits, s, last = out.float(), self.sampling, first + out.shape[1]
        if self.guided:
            c, u = logits.chunk(2)
            scale = cfg_scales(s.cfg, s.cfg_schedule, first, last, n, out.device)
            logits = (c - u).mul_(scale).add_(u)
        if draws is None:
            return logits.argmax(-1)
        u = draws[:, first:last].reshape(-1)
        picks = filter_and_sample(logits.flatten(0, 1), u, s.temperature, s.top_k, s.top_p)
        return picks.view(len(logits), -1)

    def _amp(self) -> contextlib.AbstractContextManager:
        device, amp = self.model.pos_embed.device.type, self.amp
        return contextlib.nullcontext() if amp is None else torch.autocast(device, dtype=amp)

    def _kv_cache(self, batch: int, slots: int) -> torch.nn.ModuleList:
        """A zeroed KV cache, kept while its shape holds (CUDA graphs replay on its addresses)."""
        m, device = self.model, self.model.pos_embed.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (batch, slots, amp, m.pos_embed.dtype)
        if self._cache is not None and self._cache[0] == key:
            torch._foreach_zero_(list(self._cache[1].buffers()))
            return self._cache[1]
        self._cache = (key, m.new_cache(batch, slots, amp))
        for t in self._cache[1].buffers() if self.compiled is not None else ():
            torch._dynamo.mark_static_address(t)
        return self._cache[1]

    def _step(self, x: Tensor, cache: Any, pos: Tensor, mask: Tensor, num_out: int, at) -> Tensor:
        if self.compiled is not None and not self.compile_failed:
            try:
                return self.compiled(self.model, x, cache, pos, mask, num_out, at)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compile_failed = True
                warnings.warn(
                    f"torch.compile of the decoding step {list(x.shape)} failed "
                    f"({type(e).__name__}: {str(e)[:200]}); decoding eagerly with static shapes "
                    f"instead (same tokens, no speed-up)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return self.model.decode_step(x, cache, pos, mask, num_out, at)


def _uniforms(generator: Generators, batch: int, n: int, device: torch.device) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return torch.rand(batch, n, generator=generator, device=dev).to(device)
    if len(gens := list(generator)) != batch:
        msg = f"got {len(gens)} generators for a batch of {batch}"
        raise ValueError(f"{msg}; pass one per image or a single one")
    return torch.stack([torch.rand(n, generator=g, device=g.device).to(device) for g in gens])


def _inputs(model: LPD, labels: Any, orders: Any, sizes: Sizes) -> tuple:
    """Labels and orders checked on the host, as tensors on the model's device; the sizes a list."""
    device, N, grid = model.pos_embed.device, model.num_tokens, model.grid_size
    orders = (orders if isinstance(orders, Tensor) else torch.as_tensor(np.asarray(orders))).long()
    if orders.dim() != 2 or orders.shape[1] != N:
        got = list(orders.shape)
        raise ValueError(f"orders must have shape [B, {N}] ({grid}x{grid} grid), got {got}")
    if (bad := (orders.sort(dim=1).values != torch.arange(N, device=orders.device)).any(1)).any():
        raise ValueError(f"orders row {int(bad.nonzero()[0])} is not a permutation of 0..{N - 1}")
    if labels is not None:
        labels = torch.as_tensor(check_labels(labels, len(orders), model.class_num), device=device)
    return labels, orders.to(device), validate_group_sizes(sizes, N)


def sample_tokens(
    model: LPD,
    labels: torch.Tensor | None,
    orders: torch.Tensor | np.ndarray,
    group_sizes: Sizes,
    sampling: SamplingConfig | None = None,
    *,
    greedy: bool = False,
    generator: Generators = None,
    compile: bool | str | dict = False,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:meth:`Decoder.sample` by a new :class:`Decoder`, the inputs checked."""
    sampling = sampling or SamplingConfig()
    labels, orders, sizes = _inputs(model, labels, orders, group_sizes)
    if labels is None and sampling.cfg != 1.0:
        raise ValueError("guidance needs labels; use cfg=1.0 for unconditional sampling")
    options = dict(greedy=greedy, compile=compile, autocast_dtype=autocast_dtype)
    return Decoder(model, sampling, **options).sample(labels, orders, sizes, generator)


def teacher_forced_logits(
    model: LPD, tokens: Tensor, labels: Any, orders: Any, group_sizes: Sizes, cfg: float = 1.0
) -> Tensor:
    """Head outputs of cached decoding fed the raster ``tokens``: ``[B, N, V]`` in generation order
    (``[2B, N, V]``, conditional rows first, when ``cfg != 1``)."""
    labels, orders, sizes = _inputs(model, labels, orders, group_sizes)
    tokens = torch.as_tensor(tokens, device=orders.device).long().reshape(len(orders), -1)
    decoder = Decoder(model, SamplingConfig(cfg=cfg))
    prefix = decoder.class_prefix(labels, len(orders))
    return decoder.logits(prefix, orders, sizes, torch.gather(tokens, 1, orders))


DECODE_CHUNK = 8  # the VQ decodes in chunks of this many images (padded): pixels ignore eval_bsz


def decode_tokens(
    tokenizer: torch.nn.Module, tokens: torch.Tensor, sampling: SamplingConfig
) -> np.ndarray:
    """Raster tokens ``[B, N]`` -> uint8 ``[B, H, W, 3]`` in padded chunks of
    :data:`DECODE_CHUNK`, bf16 as ``sampling`` says."""
    B, g, C = tokens.shape[0], int(round(tokens.shape[1] ** 0.5)), DECODE_CHUNK
    bf16 = sampling.bf16 and not sampling.decode_fp32
    amp = torch.autocast(tokens.device.type, dtype=torch.bfloat16)
    out = []
    with torch.no_grad(), amp if bf16 else contextlib.nullcontext():
        for c in range(0, B, C):
            chunk, n = tokens[c : c + C], min(C, B - c)
            chunk = torch.cat([chunk, chunk[-1:].expand(C - n, -1)]) if n < C else chunk
            out.append(to_uint8(tokenizer.decode(chunk.view(C, g, g)))[:n])
    return np.concatenate(out)
