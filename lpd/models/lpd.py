"""The LPD transformer: a class-conditional decoder over VQ tokens with position-query tokens.

The training sequence and its mask are in docs/design.md; parameter names are the released checkpoints'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lpd.models.kernels import Dropout, Linear, flex_attention, linear_cross_entropy
from lpd.schedules import validate_group_sizes

__all__ = ["LPDConfig", "PRESETS", "Attention", "Mlp", "Block", "KVCache", "LPD", "group_ids",
           "group_visible_mask", "group_block_mask", "ATTN_IMPLS"]

#: The released architectures (and a tiny one for CPU tests): width, depth, heads.
PRESETS: dict[str, dict[str, int]] = {
    "lpd_tiny": dict(embed_dim=64, depth=2, num_heads=4),
    "lpd_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "lpd_xl": dict(embed_dim=1280, depth=36, num_heads=20),
    "lpd_xxl": dict(embed_dim=1536, depth=48, num_heads=24),
}
ATTN_IMPLS = ("auto", "sdpa", "flex")


@dataclass(frozen=True)
class LPDConfig:
    """Architecture of an LPD model (the keyword arguments of :func:`lpd.models.build_lpd`)."""

    img_size: int = 256
    vqgan_stride: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 16384
    class_num: int = 1000
    layernorm_eps: float = 1e-6
    attn_dropout: float = 0.1  # accepted as the released constructor; attention probabilities are not dropped
    proj_dropout: float = 0.1
    label_drop_prob: float = 0.1
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("img_size", "vqgan_stride", "embed_dim", "depth", "num_heads", "vocab_size", "class_num"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.img_size % self.vqgan_stride:
            raise ValueError(f"img_size {self.img_size} must be a multiple of vqgan_stride {self.vqgan_stride} (e.g. 256 or 512)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        for name in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model config: {name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str | None, img_size: int = 256, **overrides: Any) -> "LPDConfig":
        """A preset (``lpd_l`` ...) at ``img_size`` with ``overrides`` (not of its width, depth or heads);
        ``name=None``: the overrides alone."""
        if unknown := sorted(set(overrides) - set(cls.__dataclass_fields__)):
            raise ValueError(f"model_config: unknown key(s) {', '.join(unknown)}; the keys are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        if name is None:
            return cls(img_size=img_size, **overrides)
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}, or give a model_config without a preset name")
        clash = [f"{k}={overrides[k]} (the preset has {v})" for k, v in PRESETS[name].items() if k in overrides and overrides[k] != v]
        if clash:
            raise ValueError(f"model_config sets {', '.join(clash)}, which is not the {name} preset; "
                             f"drop --model (set model: null) to build the model_config alone, or drop those keys")
        return cls(img_size=img_size, **{**PRESETS[name], **overrides})

    @property
    def grid_size(self) -> int:
        return self.img_size // self.vqgan_stride

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head softmax attention (scale ``head_dim**-0.5``, qkv bias, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: Any = None, cache: "KVCache | None" = None,
                pos: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
        """Attention of ``x [B, T, C]`` under ``mask`` (bool ``[T', S]``, True = may attend, or a ``BlockMask``);
        ``cache``: write slots ``pos``, attend to its first ``S``; ``last``: only the last rows out."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(pos, k, v)
            k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if last is not None and last < T:
            q, T = q[:, :, T - last :], last
        if isinstance(mask, torch.Tensor) or mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[-T:])
        else:
            out = flex_attention(q, k, v, mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = Linear(dim, hidden), nn.GELU(), Dropout(drop)
        self.fc2, self.drop2 = Linear(hidden, dim), Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, mask: Any = None, cache: "KVCache | None" = None,
                pos: torch.Tensor | None = None, last: int | None = None) -> torch.Tensor:
        """As :meth:`Attention.forward`; with ``last`` only the last rows go on past the keys and values."""
        h = self.attn(self.norm1(x), mask, cache, pos, last)
        x = x[:, x.shape[1] - h.shape[1] :] + h
        return x + self.mlp(self.norm2(x))


def group_ids(group_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Group number of every row of the training sequence: ``(context [1 + N - g_{K-1}], queries [N])``."""
    sizes = torch.tensor(list(group_sizes), dtype=torch.long)
    ctx = torch.cat([torch.zeros(1, dtype=torch.long), torch.repeat_interleave(torch.arange(1, len(sizes)), sizes[:-1])])
    return ctx, torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def group_visible_mask(group_sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean training mask ``[L, L]`` (True = may attend), ``L = 1 + 2N - g_{K-1}``."""
    ctx, qry = group_ids(group_sizes)
    n = ctx.numel()
    mask = torch.zeros(n + qry.numel(), n + qry.numel(), dtype=torch.bool)
    mask[:n, :n] = ctx[None, :] <= ctx[:, None]
    mask[n:, :n] = ctx[None, :] <= qry[:, None]
    mask[n:, n:] = qry[None, :] == qry[:, None]
    return mask.to(device)


def group_block_mask(group_sizes: Sequence[int], device: torch.device | str, queries_only: bool = False) -> Any:
    """The training mask as a block-sparse flex-attention ``BlockMask`` (rows: all, or the queries only)."""
    from torch.nn.attention.flex_attention import create_block_mask
    ctx, qry = group_ids(group_sizes)
    n = ctx.numel()
    gid = torch.cat([ctx, qry]).to(device)
    is_query = (torch.arange(gid.numel()) >= n).to(device)
    offset = n if queries_only else 0
    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_idx = q_idx + offset
        same_query_group = is_query[q_idx] & (gid[kv_idx] == gid[q_idx])
        return torch.where(is_query[kv_idx], same_query_group, gid[kv_idx] <= gid[q_idx])
    return create_block_mask(mask_mod, None, None, gid.numel() - offset, gid.numel(), device=device)


class KVCache(nn.Module):
    """Static keys and values of one attention layer, ``[B, heads, slots, head_dim]``, allocated once."""

    def __init__(self, batch: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, heads, T, head_dim]`` into slots ``pos [T]``; return the whole cache."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


class LPD(nn.Module):
    """Locality-aware parallel decoder (class-conditional transformer over VQ tokens)."""

    def __init__(self, config: LPDConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = config
        D, N = config.embed_dim, config.num_tokens
        self.num_tokens, self.grid_size = N, config.grid_size
        self.vocab_size, self.class_num = config.vocab_size, config.class_num
        self.label_drop_prob, self.grad_checkpointing = config.label_drop_prob, config.grad_checkpointing
        self.class_emb = nn.Embedding(config.class_num, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.token_emb = nn.Embedding(config.vocab_size, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        self.z_proj_ln = nn.LayerNorm(D, eps=config.layernorm_eps)
        self.blocks = nn.ModuleList(Block(D, config.num_heads, config.mlp_ratio, config.layernorm_eps, config.proj_dropout)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.layernorm_eps)
        self.head = Linear(D, config.vocab_size, bias=False)
        self._masks: dict[tuple, Any] = {}
        self.set_attn_impl(attn_impl)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Clipped normal (std 0.02) embeddings, Xavier-uniform linears; a function of ``generator`` alone."""
        for t in (self.class_emb.weight, self.fake_latent, self.token_emb.weight, self.mask_token, self.pos_embed):
            t.copy_(torch.randn(t.shape, generator=generator).mul_(0.02).clamp_(-0.04, 0.04))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator).mul_(2 * bound).sub_(bound))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_impl(self, attn_impl: str) -> None:
        """Training attention: ``sdpa``, ``flex`` (on a CPU forward only) or ``auto`` (flex on CUDA); decoding uses SDPA."""
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl

    def uses_flex(self, device: torch.device | str) -> bool:
        return self.attn_impl == "flex" or (self.attn_impl == "auto" and torch.device(device).type == "cuda")

    def group_mask(self, group_sizes: Sequence[int], device: torch.device, flex: bool = False, queries_only: bool = False) -> Any:
        """The training mask of a schedule (dense, or flex ``BlockMask``), built once per device and cached."""
        key = (tuple(group_sizes), str(device), flex, queries_only)
        if key not in self._masks:
            self._masks[key] = (group_block_mask(group_sizes, device, queries_only) if flex
                                else group_visible_mask(group_sizes, device))
        return self._masks[key]

    def embed_condition(self, labels: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition embeddings ``[B, D]``: class embeddings, ``fake_latent`` where labels are None or dropped."""
        fake = self.fake_latent.expand(batch, -1)
        if labels is None:
            return fake
        cond = self.class_emb(labels)
        return cond if drop is None else torch.where(drop[:, None], fake.to(cond.dtype), cond)

    def embed_context(self, cond: torch.Tensor | None, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Context rows ``[B, (1 +) M, D]``: the condition ``[B, D]`` (optional) then ``tokens`` at raster ``positions``."""
        x = self.token_emb(tokens) + self.pos_embed[0, 1:][positions]
        if cond is not None:
            x = torch.cat([(cond + self.pos_embed[0, 0]).unsqueeze(1), x], dim=1)
        return self.z_proj_ln(x)

    def embed_queries(self, positions: torch.Tensor) -> torch.Tensor:
        """Position queries ``[B, M, D]`` at raster ``positions [B, M]``."""
        return self.z_proj_ln(self.mask_token + self.pos_embed[0, 1:][positions])

    def _check(self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor, group_sizes: Sequence[int]) -> None:
        B, N = orders.shape[0], self.num_tokens
        if orders.dim() != 2 or orders.shape[1] != N:
            raise ValueError(f"orders must have shape [B, {N}] for a {self.grid_size}x{self.grid_size} grid, got {list(orders.shape)}")
        if tokens.reshape(tokens.shape[0], -1).shape != (B, N):
            raise ValueError(f"tokens must have shape [{B}, {N}] (raster order), got {list(tokens.shape)}")
        if labels is not None and labels.shape != (B,):
            raise ValueError(f"labels must have shape [{B}], got {list(labels.shape)}")
        validate_group_sizes(group_sizes, N)

    def _train_pass(self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor,
                    group_sizes: Sequence[int], drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm outputs of the ``N`` queries ``[B, N, D]`` and their targets (tokens in generation order)."""
        self._check(tokens, labels, orders, group_sizes)
        B, N = orders.shape
        targets = torch.gather(tokens.reshape(B, N), 1, orders)
        n_ctx = N - group_sizes[-1]
        x = torch.cat([self.embed_context(self.embed_condition(labels, B, drop), targets[:, :n_ctx], orders[:, :n_ctx]),
                       self.embed_queries(orders)], dim=1)
        flex = self.uses_flex(x.device)
        if flex and x.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("attn_impl='flex' has no backward pass on the CPU; train there with 'sdpa' or 'auto'")
        mask, last_mask = self.group_mask(group_sizes, x.device, flex), self.group_mask(group_sizes, x.device, flex, flex)
        for i, blk in enumerate(self.blocks):
            m, last = (last_mask, N) if i == len(self.blocks) - 1 else (mask, None)  # last block: query rows only
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, m, None, None, last, use_reentrant=False)
            else:
                x = blk(x, m, last=last)
        return self.norm(x), targets

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, N, V]`` of ``tokens[b, orders[b, j]]`` at index ``j``; no label dropout (None: unconditional)."""
        return self.head(self._train_pass(tokens, labels, orders, list(group_sizes))[0])

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor,
                group_sizes: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean cross-entropy of predicting every token; label dropout in train mode."""
        drop = None
        if self.training and labels is not None and self.label_drop_prob > 0:
            dev = generator.device if generator is not None else labels.device
            drop = torch.rand(labels.shape[0], generator=generator, device=dev).to(labels.device) < self.label_drop_prob
        h, targets = self._train_pass(tokens, labels, orders, list(group_sizes), drop)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1))

    def new_cache(self, batch: int, slots: int, dtype: torch.dtype | None = None) -> nn.ModuleList:
        """One static :class:`KVCache` per block (``dtype`` default: the parameters')."""
        c, dtype = self.config, dtype or self.pos_embed.dtype
        return nn.ModuleList(KVCache(batch, c.num_heads, slots, c.embed_dim // c.num_heads, dtype, self.pos_embed.device)
                             for _ in range(c.depth))

    def prefill(self, x: torch.Tensor, cache: nn.ModuleList, pos: torch.Tensor, mask: torch.Tensor) -> None:
        """Write the keys and values of embedded context rows ``x`` (condition, known tokens) into slots ``pos``."""
        for blk, c in zip(self.blocks[:-1], cache):
            x = blk(x, mask, c, pos)
        blk = self.blocks[-1]
        _, k, v = blk.attn.qkv(blk.norm1(x)).reshape(*x.shape[:2], 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        cache[-1].update(pos, k, v)  # the last block's outputs feed nothing

    def decode_step(self, x: torch.Tensor, cache: nn.ModuleList, pos: torch.Tensor, mask: torch.Tensor, num_out: int) -> torch.Tensor:
        """Rows ``x [B, T, D]`` write slots ``pos [T]``, attend through ``mask [T, S]``; logits of the last ``num_out``."""
        for i, (blk, c) in enumerate(zip(self.blocks, cache)):
            x = blk(x, mask, c, pos, num_out if i == len(self.blocks) - 1 else None)
        return self.head(self.norm(x))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups of the released recipe: no weight decay on biases, norms and other 1-D parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_lpd(**config: Any) -> LPD:
    """An LPD model of any size: the keyword arguments of :class:`LPDConfig`."""
    return LPD(LPDConfig(**config))


def _preset(name: str):
    def make(img_size: int = 256, **overrides: Any) -> LPD:
        return LPD(replace(LPDConfig.from_name(name, img_size), **overrides))
    make.__name__ = name
    make.__doc__ = f"The {name} preset {PRESETS[name]} at ``img_size``; keyword arguments override the config."
    return make


lpd_tiny, lpd_l, lpd_xl, lpd_xxl = (_preset(n) for n in PRESETS)
