"""The LPD transformer: a class-conditional decoder over VQ tokens with position-query tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lpd.config import check_positive
from lpd.models.kernels import Dropout, Linear, flex_attention, linear_cross_entropy
from lpd.models.text import TextPrefix
from lpd.schedules import validate_group_sizes

__all__ = ["LPDConfig", "PRESETS", "LPD", "KVCache", "attends", "group_visible_mask", "build_lpd"]

#: The released architectures (and a tiny one for CPU tests): width, depth, heads.
PRESETS: dict[str, dict[str, int]] = {
    "lpd_tiny": dict(embed_dim=64, depth=2, num_heads=4),
    "lpd_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "lpd_xl": dict(embed_dim=1280, depth=36, num_heads=20),
    "lpd_xxl": dict(embed_dim=1536, depth=48, num_heads=24),
}
ATTN_IMPLS = ("auto", "sdpa", "flex")
Rows = tuple[Tensor, Tensor, Tensor]  # (slot, group, is_query) of rows or keys
ROPE_BASE = 100.0  # rotary frequencies base ** (-i / (head_dim / 4)) per grid axis
_POSITIVE = "img_size vqgan_stride embed_dim depth num_heads vocab_size class_num text_dim"


@dataclass(frozen=True)
class LPDConfig:
    """Architecture of an LPD model (the keyword arguments of :func:`build_lpd`)."""

    img_size: int = 256
    vqgan_stride: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 16384
    class_num: int = 1000
    layernorm_eps: float = 1e-6
    attn_dropout: float = 0.1  # accepted as released; attention probabilities are not dropped
    proj_dropout: float = 0.1
    label_drop_prob: float = 0.1  # condition (class label or caption) dropout in training
    grad_checkpointing: bool = False
    condition: str = "class"  # "class" (class_num labels) or "text" (caption features)
    text_dim: int = 2048  # caption feature width (FLAN-T5-XL: 2048); with condition "text"
    max_text_tokens: int = 120  # caption rows at most; with condition "text"
    text_encoder: dict | None = None  # the record of the text encoder it was trained with
    rope: float = 0.0  # share of each head's width also turned by 2-D rotary positions (0: none)
    text_noise: float = 0.0  # training: caption features + N(0, (this x each row's RMS)^2)

    def __post_init__(self) -> None:
        for name in [*_POSITIVE.split(), "max_text_tokens"]:
            check_positive(getattr(self, name), f"model config: {name}", ValueError)
        if self.img_size % self.vqgan_stride:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of vqgan_stride {self.vqgan_stride} "
                f"(e.g. 256 or 512)"
            )
        if (cond := self.condition) not in ("class", "text"):
            raise ValueError(f"model config: condition must be 'class' or 'text', got {cond!r}")
        if (dim := self.embed_dim) % (heads := self.num_heads):
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {heads}")
        rope = self.rope if isinstance(self.rope, (int, float)) else -1
        if not (0.0 <= rope <= 1.0 and dim // heads * rope % 4 == 0):
            raise ValueError(
                f"model config: rope must be in [0, 1] and turn a multiple of 4 of the "
                f"{dim // heads} channels of a head, got {self.rope!r}"
            )
        if not (isinstance(v := self.text_noise, (int, float)) and 0 <= v < math.inf):
            raise ValueError(f"model config: text_noise must be a number >= 0, got {v!r}")
        if self.text_noise and self.condition != "text":
            raise ValueError("model config: text_noise needs condition 'text' (caption features)")
        for name in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            if not 0.0 <= (v := getattr(self, name)) <= 1.0:
                raise ValueError(f"model config: {name} must be in [0, 1], got {v}")

    @classmethod
    def from_name(cls, name: str | None, img_size: int = 256, **overrides: Any) -> LPDConfig:
        """A preset at ``img_size`` with ``overrides`` (not of its width, depth or heads); ``name``
        None: the overrides alone."""
        if unknown := ", ".join(sorted(set(overrides) - set(keys := cls.__dataclass_fields__))):
            raise ValueError(
                f"model_config: unknown key(s) {unknown}; the keys are {', '.join(keys)}"
            )
        if name is None:
            return cls(img_size=img_size, **overrides)
        if name not in PRESETS:
            raise ValueError(
                f"unknown model {name!r}; choose one of {sorted(PRESETS)}, or give a model_config "
                f"without a preset name"
            )
        preset = PRESETS[name]
        if clash := {k: v for k, v in preset.items() if overrides.get(k, v) != v}:
            sets = ", ".join(f"{k}={overrides[k]} (the preset has {v})" for k, v in clash.items())
            raise ValueError(
                f"model_config sets {sets}, which is not the {name} preset; drop "
                f"--model (set model: null) to build the model_config alone, or drop those keys"
            )
        return cls(img_size=img_size, **{**preset, **overrides})

    @property
    def grid_size(self) -> int:
        return self.img_size // self.vqgan_stride

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotary_angles(positions: Tensor, grid: int, width: int) -> tuple[Tensor, Tensor]:
    """``(cos, sin) [B, 1, T, width / 2]`` of raster ``positions [B, T]`` on a ``grid``-wide
    grid: the first half of the angles by row, the second by column; position -1: angle 0."""
    n = width // 4
    freqs = ROPE_BASE ** -(torch.arange(n, device=positions.device, dtype=torch.float32) / n)
    p = positions.clamp(min=0)[..., None]
    angles = torch.cat([(p // grid) * freqs, (p % grid) * freqs], -1) * (positions >= 0)[..., None]
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x: Tensor, rot: tuple[Tensor, Tensor]) -> Tensor:
    """``x [B, H, T, d]`` with each pair ``(x[i], x[i + w/2])`` of its first ``w`` channels turned
    by the angle of ``rot`` (``w / 2`` angles)."""
    (cos, sin), w = (t.to(x.dtype) for t in rot), 2 * rot[0].shape[-1]
    a, b = x[..., :w].chunk(2, -1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., w:]], -1)


class Attention(nn.Module):
    """Multi-head softmax attention (scale ``head_dim**-0.5``, qkv bias, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = Linear(dim, dim * 3, bias=True), Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: Tensor, mask=None, cache=None, pos=None, last=None, rot=None) -> Tensor:
        """Attention of ``x [B, T, C]`` under ``mask`` (bool ``[(B, 1,) T', S]`` or ``BlockMask``);
        ``cache``: write slots ``pos``, read the first ``S``; ``last``: only the last rows out;
        ``rot``: :func:`rotary_angles` of the rows, turning queries and keys."""
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rot is not None:
            q, k = rotate(q, rot), rotate(k, rot)
        if cache is not None:
            k, v = [t[:, :, : mask.shape[-1]] for t in cache.update(pos, k, v)]
        if last is not None and last < T:
            q, T = q[:, :, T - last :], last
        if isinstance(mask, Tensor) or mask is None:
            attn_mask = None if mask is None else mask[..., -T:, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            out = flex_attention(q, k, v, mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = Linear(dim, hidden), nn.GELU(), Dropout(drop)
        self.fc2, self.drop2 = Linear(hidden, dim), Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, proj_drop: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, num_heads, proj_drop)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: Tensor, mask=None, cache=None, pos=None, last=None, rot=None) -> Tensor:
        """As :meth:`Attention.forward`; with ``last`` only the last rows go on."""
        h = self.attn(self.norm1(x), mask, cache, pos, last, rot)
        x = x[:, x.shape[1] - h.shape[1] :] + h
        return x + self.mlp(self.norm2(x))


def attends(row: Rows, key: Rows, key_valid: Tensor | None = None) -> Tensor:
    """The attention rule of training, decoding and prefill, elementwise over ``(slot, group,
    is_query)`` of rows and keys. The prefix rows are context group 0, the tokens of decoding group
    ``k`` context group ``k + 1``. A context row of group ``a`` sees the context of groups ``<= a``;
    a query of group ``k`` the context of groups ``<= k`` and the queries of group ``k``; keys with
    ``key_valid`` False (padding) nobody; every row its own slot (a padded row stays finite)."""
    (r_slot, r_group, r_query), (k_slot, k_group, k_query) = row, key
    see = torch.where(k_query, r_query & (k_group == r_group), k_group <= r_group)
    return (see if key_valid is None else see & key_valid) | (k_slot == r_slot)


def sequence_rows(group_sizes: Sequence[int], n_prefix: int = 1, device: Any = "cpu") -> Rows:
    """``(slot, group, is_query)`` of the training sequence: ``n_prefix`` prefix rows, the tokens of
    every group but the last, then the queries of every group."""
    ids = torch.arange(len(group_sizes))
    context = torch.repeat_interleave(ids, torch.tensor([n_prefix, *group_sizes[:-1]]))
    group = torch.cat([context, torch.repeat_interleave(ids, torch.tensor(list(group_sizes)))])
    slot = torch.arange(len(group))
    return tuple(t.to(device) for t in (slot, group, slot >= len(context)))


def valid_keys(prefix_mask: Tensor | None, n: int) -> Tensor | None:
    """``[B, n]``: which keys may be seen: ``prefix_mask [B, L]`` (False: padding), then all."""
    if prefix_mask is not None:
        return F.pad(prefix_mask.bool(), (0, n - prefix_mask.shape[1]), value=True)
    return None


def group_visible_mask(
    sizes: Sequence[int], device: Any = "cpu", n_prefix: int = 1, prefix_mask: Tensor | None = None
) -> Tensor:
    """Boolean training mask ``[T, T]`` (True = may attend; ``[B, 1, T, T]`` with ``prefix_mask
    [B, L]``), ``T = L + 2N - g_{K-1}``."""
    rows = sequence_rows(sizes, n_prefix, device)
    valid = valid_keys(prefix_mask, len(rows[0]))
    return attends(
        tuple(t[:, None] for t in rows), rows, None if valid is None else valid[:, None, None]
    )


def group_block_mask(sizes: Sequence[int], device, queries_only: bool, n_prefix: int, prefix_mask):
    """The training mask as a flex-attention ``BlockMask`` (rows: all, or the queries)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _, group, query = sequence_rows(sizes, n_prefix, device)
    T, valid = len(group), valid_keys(prefix_mask, len(group))
    offset = T - sum(sizes) if queries_only else 0

    def mask_mod(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_idx, ok = q_idx + offset, None if valid is None else valid[b, kv_idx]
        return attends(
            (q_idx, group[q_idx], query[q_idx]), (kv_idx, group[kv_idx], query[kv_idx]), ok
        )

    B = None if valid is None else len(valid)
    return create_block_mask(mask_mod, B, None, T - offset, T, device=device)


class KVCache(nn.Module):
    """Static keys and values of one attention layer, ``shape [B, heads, slots, head_dim]``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, heads, T, head_dim]`` into slots ``pos [T]``; return the whole cache."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


class LPD(nn.Module):
    """Locality-aware parallel decoder (class-conditional transformer over VQ tokens)."""

    def __init__(self, config: LPDConfig, attn_impl: str = "auto"):
        super().__init__()
        c, D, N = config, config.embed_dim, config.num_tokens
        self.config, self.num_tokens, self.grid_size = c, N, c.grid_size
        self.vocab_size, self.class_num = c.vocab_size, c.class_num
        self.label_drop_prob, self.grad_checkpointing = c.label_drop_prob, c.grad_checkpointing
        if c.condition == "class":
            self.class_emb = nn.Embedding(c.class_num, D)
            self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.token_emb = nn.Embedding(c.vocab_size, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        self.z_proj_ln = nn.LayerNorm(D, eps=c.layernorm_eps)
        self.blocks = nn.ModuleList(
            Block(D, c.num_heads, c.mlp_ratio, c.layernorm_eps, c.proj_dropout)
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(D, eps=c.layernorm_eps)
        self.head = Linear(D, c.vocab_size, bias=False)
        self.text = TextPrefix(c.text_dim, D, c.max_text_tokens) if c.condition == "text" else None
        self._masks: dict[tuple, Any] = {}
        self.set_attn_impl(attn_impl)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Clipped normal (std 0.02) embeddings, Xavier-uniform linears; from ``generator``."""
        cond = (self.text.null, self.text.pos) if self.text else (self.class_emb, self.fake_latent)
        for t in (*cond, self.token_emb, self.mask_token, self.pos_embed):
            t = getattr(t, "weight", t)
            t.copy_(torch.randn(t.shape, generator=generator).mul_(0.02).clamp_(-0.04, 0.04))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                b = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator).mul_(2 * b).sub_(b))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    @property
    def img_size(self) -> int:
        return int(self.config.img_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_impl(self, attn_impl: str) -> None:
        """Training attention: ``sdpa``, ``flex`` (on the CPU: no backward) or ``auto``."""
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl

    def uses_flex(self, device: torch.device | str) -> bool:
        impl = self.attn_impl
        return impl == "flex" or impl == "auto" and torch.device(device).type == "cuda"

    def cached(self, key: tuple, build: Any) -> Any:
        """``build()``, once per ``key`` (the training masks, the decoding plans)."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def group_mask(
        self,
        group_sizes: Sequence[int],
        device: Any,
        flex: bool = False,
        queries_only: bool = False,
        n_prefix: int = 1,
        prefix_mask: Tensor | None = None,
    ) -> Any:
        """The training mask (dense or flex); cached per device when there is no ``prefix_mask``."""

        def build() -> Any:
            if flex:
                return group_block_mask(group_sizes, device, queries_only, n_prefix, prefix_mask)
            return group_visible_mask(group_sizes, device, n_prefix, prefix_mask)

        if prefix_mask is not None:
            return build()
        return self.cached((tuple(group_sizes), str(device), flex, queries_only, n_prefix), build)

    def embed_condition(self, labels: Tensor | None, batch: int, drop=None) -> Tensor:
        """Condition rows ``[B, 1, D]`` of class ``labels`` (``fake_latent``: None or dropped)."""
        cond = self.fake_latent.expand(batch, -1)
        if labels is not None:
            emb = self.class_emb(labels)
            cond = emb if drop is None else torch.where(drop[:, None], cond.to(emb.dtype), emb)
        return cond[:, None]

    def text_prefix(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Caption rows ``[B, L, D]`` and their mask: :meth:`lpd.models.text.TextPrefix.forward`."""
        if self.text is None:
            raise ValueError("this model is class-conditional (condition 'class'); it takes labels")
        return self.text(*args, **kwargs)

    def embed_prefix(self, cond: Tensor) -> Tensor:
        """Prefix rows ``[B, L, D]`` of condition rows ``cond [B, L, D]`` (at position 0)."""
        return self.z_proj_ln(cond + self.pos_embed[0, 0])

    def embed_tokens(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Context rows ``[B, M, D]`` of ``tokens`` at raster ``positions``."""
        return self.z_proj_ln(self.token_emb(tokens) + self.pos_embed[0, 1:][positions])

    def embed_queries(self, positions: Tensor) -> Tensor:
        """Position queries ``[B, M, D]`` at raster ``positions [B, M]``."""
        return self.z_proj_ln(self.mask_token + self.pos_embed[0, 1:][positions])

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """:func:`rotary_angles` of rows at raster ``positions [B, T]`` (-1: a prefix or padding
        row) on the model's ``rope`` share of each head's channels; None without ``rope``."""
        if not (c := self.config).rope:
            return None
        width = round(c.embed_dim // c.num_heads * c.rope)
        return rotary_angles(positions, self.grid_size, width)

    def _check(self, tokens, labels, orders, sizes, cond, cond_mask) -> list[int]:
        """The inputs of a training pass checked; the group sizes as a list."""
        B, N, D, g = orders.shape[0], self.num_tokens, self.config.embed_dim, self.grid_size
        if orders.dim() != 2 or orders.shape[1] != N:
            raise ValueError(f"orders must have shape [B, {N}] ({g}x{g}), got {list(orders.shape)}")
        if tokens.reshape(tokens.shape[0], -1).shape != (B, N):
            raise ValueError(f"tokens must have shape [{B}, {N}], got {list(tokens.shape)}")
        if labels is not None and labels.shape != (B,):
            raise ValueError(f"labels must have shape [{B}], got {list(labels.shape)}")
        if cond is not None and (labels is not None or cond.shape[:1] + cond.shape[2:] != (B, D)):
            raise ValueError(f"cond must be [{B}, L, {D}] (and no labels), got {list(cond.shape)}")
        L = 1 if cond is None else cond.shape[1]
        if cond_mask is not None and (cond_mask.dtype != torch.bool or cond_mask.shape != (B, L)):
            got = f"{cond_mask.dtype} {list(cond_mask.shape)}"
            raise ValueError(f"cond_mask must be bool [{B}, {L}] (False: padding), got {got}")
        return validate_group_sizes(sizes, N)

    def _train_pass(self, tokens, labels, orders, sizes, drop, cond, cond_mask, text) -> tuple:
        """Final-norm outputs of the ``N`` queries ``[B, N, D]`` and their targets (tokens in
        generation order); ``text``: caption features, dropped by ``drop``."""
        if text is not None:
            (cond, cond_mask), drop = self.text_prefix(text, cond_mask, drop), None
        sizes = self._check(tokens, labels, orders, sizes, cond, cond_mask)
        B, N = orders.shape
        targets = torch.gather(tokens.reshape(B, N), 1, orders)
        n_ctx = N - sizes[-1]
        cond = self.embed_condition(labels, B, drop) if cond is None else cond
        x = [self.embed_prefix(cond), self.embed_tokens(targets[:, :n_ctx], orders[:, :n_ctx])]
        x = torch.cat([*x, self.embed_queries(orders)], dim=1)
        flex, L, dev = self.uses_flex(x.device), cond.shape[1], x.device
        if flex and dev.type == "cpu" and torch.is_grad_enabled():
            msg = "attn_impl='flex' has no backward pass on the CPU"
            raise RuntimeError(f"{msg}; train there with 'sdpa' or 'auto'")
        mask = self.group_mask(sizes, dev, flex, False, L, cond_mask)
        last_mask = self.group_mask(sizes, dev, True, True, L, cond_mask) if flex else mask
        rot = None
        if self.config.rope:  # prefix rows: -1
            rot = self.rotary(F.pad(torch.cat([orders[:, :n_ctx], orders], 1), (L, 0), value=-1))
        for i, blk in enumerate(self.blocks):
            m, last = (last_mask, N) if i == len(self.blocks) - 1 else (mask, None)  # last: queries
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, m, None, None, last, rot, use_reentrant=False)
            else:
                x = blk(x, m, last=last, rot=rot)
        return self.norm(x), targets

    def logits(
        self,
        tokens: Tensor,
        labels: Tensor | None,
        orders: Tensor,
        group_sizes: Sequence[int],
        *,
        cond: Tensor | None = None,
        cond_mask: Tensor | None = None,
        text: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[B, N, V]`` of ``tokens[b, orders[b, j]]`` at index ``j``, no dropout; instead
        of ``labels`` (None: unconditional) condition rows ``cond [B, L, D]`` (``cond_mask [B, L]``:
        False = padding) or caption features ``text [B, L, text_dim]`` (mask ``cond_mask``)."""
        args = (tokens, labels, orders, group_sizes, None, cond, cond_mask, text)
        return self.head(self._train_pass(*args)[0])

    def forward(
        self,
        tokens: Tensor,
        labels: Tensor | None,
        orders: Tensor,
        group_sizes: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        cond: Tensor | None = None,
        cond_mask: Tensor | None = None,
        text: Tensor | None = None,
    ) -> Tensor:
        """Mean cross-entropy of predicting every token; label (caption) dropout and caption
        feature noise (``text_noise``) in train mode; ``cond``, ``cond_mask``, ``text``: as
        :meth:`logits`."""
        drop, given = None, labels if text is None else text
        dev = generator.device if generator is not None else getattr(given, "device", None)
        if self.training and given is not None and self.label_drop_prob > 0:
            u = torch.rand(given.shape[0], generator=generator, device=dev)
            drop = u.to(given.device) < self.label_drop_prob
        if self.training and text is not None and (a := self.config.text_noise) > 0:
            noise = torch.randn(text.shape, generator=generator, device=dev).to(text)
            text = text + noise * text.pow(2).mean(-1, keepdim=True).sqrt() * a
        args = (tokens, labels, orders, group_sizes, drop, cond, cond_mask, text)
        h, targets = self._train_pass(*args)
        return linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten())

    def new_cache(self, batch: int, slots: int, dtype: torch.dtype | None = None) -> nn.ModuleList:
        """One static :class:`KVCache` per block (``dtype`` default: the parameters')."""
        c, p = self.config, self.pos_embed
        shape = (batch, c.num_heads, slots, c.embed_dim // c.num_heads)
        return nn.ModuleList(KVCache(shape, dtype or p.dtype, p.device) for _ in range(c.depth))

    def decode_step(
        self,
        x: Tensor,
        cache: nn.ModuleList,
        pos: Tensor,
        mask: Tensor,
        num_out: int,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Rows ``x [B, T, D]`` at raster ``positions [B, T]`` (for ``rope``) write slots ``pos
        [T]``, attend through ``mask [(B, 1,) T, S]``; logits of the last ``num_out``."""
        rot = None if positions is None else self.rotary(positions)
        for i, (blk, c) in enumerate(zip(self.blocks, cache)):
            x = blk(x, mask, c, pos, num_out if i == len(self.blocks) - 1 else None, rot)
        return self.head(self.norm(x))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms and other 1-D parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        groups = ((decay, weight_decay), (no_decay, 0.0))
        return [{"params": params, "weight_decay": wd} for params, wd in groups]


def build_lpd(**config: Any) -> LPD:
    """An LPD model of any size: the keyword arguments of :class:`LPDConfig`."""
    return LPD(LPDConfig(**config))
