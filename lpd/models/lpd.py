"""The LPD transformer: a class-conditional decoder over VQ tokens with position-query tokens.

Reads top to bottom: attention and MLP blocks, the group-visible attention mask, then the model
(`LPD`) with its training pass (:meth:`LPD.logits`, :meth:`LPD.forward`) and the pieces the
KV-cached decoder in :mod:`lpd.sampling` calls (:meth:`LPD.embed_condition`,
:meth:`LPD.forward_cached`).  Parameter names are those of the released checkpoints
(``../shared/LPD_SPEC.md`` section 1); do not rename them.

Sequence layout of the training pass (spec section 2), for group sizes ``g_0..g_{K-1}``:

* context stream, length ``1 + N - g_{K-1}``: the condition, then the tokens of groups
  ``0..K-2`` in generation order, each plus the position embedding of its raster position;
* query stream, length ``N``: ``mask_token`` plus the position embedding of every position, in
  generation order.

A context token of context group ``a`` (group 0 is the condition, group ``k+1`` holds decoding group
``k``) sees context groups ``<= a``; a query of decoding group ``k`` sees context groups ``<= k``
and every query of its own group.

Speed (issue 7):

* the training mask is built once per schedule (:meth:`LPD.group_mask`); on CUDA the training
  attention can run as flex attention with a cached block-sparse ``BlockMask`` (``attn_impl``);
* the last block computes attention outputs and the MLP only for the rows whose outputs are used
  (the queries), while still writing every row's keys and values;
* the head and the cross-entropy of the training pass share one logits buffer
  (:func:`linear_cross_entropy`); dropout on the CPU draws a cheaper mask (:class:`Dropout`);
* on the CPU, inference multiplies the few rows of a decoding step with prepacked weights
  (:class:`Linear`);
* :meth:`LPD.forward_static` is a static-shape decoding step (fixed input length, attention over
  the whole cache through a mask) that ``torch.compile`` turns into one graph per schedule.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lpd.schedules import validate_group_sizes

__all__ = [
    "LPDConfig",
    "LPD",
    "Attention",
    "Block",
    "Mlp",
    "Linear",
    "Dropout",
    "group_visible_mask",
    "group_ids",
    "group_block_mask",
    "linear_cross_entropy",
    "KVCache",
    "ATTN_IMPLS",
    "flex_attention_available",
]

#: Values of the ``attn_impl`` model option (see :meth:`LPD.set_attn_impl`).
ATTN_IMPLS = ("auto", "sdpa", "flex")


def flex_attention_available() -> bool:
    """Whether the installed torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_COMPILED_FLEX: Any = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """Flex attention with ``block_mask``: the compiled (fused, block-sparse) kernel on CUDA, the
    eager reference implementation elsewhere (torch's CPU kernel has no backward pass)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX(q, k, v, block_mask=block_mask)


@dataclass(frozen=True)
class LPDConfig:
    """Architecture of an LPD model; the keyword arguments of :func:`lpd.models.build_lpd`."""

    img_size: int = 256
    vqgan_stride: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 16384
    class_num: int = 1000
    layernorm_eps: float = 1e-6
    # Accepted for compatibility with the released constructor.  Like the released code's fused
    # attention path (spec section 6), attention probabilities are not dropped.
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    label_drop_prob: float = 0.1
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.img_size % self.vqgan_stride != 0:
            raise ValueError(
                f"img_size {self.img_size} must be a positive multiple of vqgan_stride {self.vqgan_stride} "
                f"(e.g. 256 or 512 with the 16x VQ)"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        for name in ("depth", "num_heads", "vocab_size", "class_num"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.label_drop_prob <= 1.0:
            raise ValueError(f"label_drop_prob must be in [0, 1], got {self.label_drop_prob}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.vqgan_stride

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _prepack_supported() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# Prepacked (oneDNN-blocked) copies of Linear weights, keyed weakly by module (not stored on the
# module: the opaque tensors cannot be deep-copied or saved).
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], torch.Tensor]]" = weakref.WeakKeyDictionary()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) with a faster CPU inference path.

    A decoding step feeds few rows (batch x rows of the step), where MKL's ``x @ W^T`` runs far
    below peak.  On the CPU, in float32, without autograd and outside ``torch.compile``, layers
    whose both sides are at least :attr:`PREPACK_MIN_FEATURES` multiply inputs of at most
    :attr:`PREPACK_MAX_ROWS` rows with a oneDNN-prepacked copy of the weight (packed once,
    re-packed when the weight changes; measured 1.3-2.9x faster per product for 1024-wide layers
    and 4-80 rows on AVX-512).  Results equal ``F.linear`` up to float rounding.  The packed
    copies cost the memory of the large weights once more; set ``Linear.cpu_prepack = False`` to
    keep plain ``F.linear`` everywhere.  Training, GPUs and autocast always use ``F.linear``.
    """

    cpu_prepack: bool = True
    PREPACK_MAX_ROWS = 256
    PREPACK_MIN_FEATURES = 512

    def _packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        hit = _PACKED.get(self)
        if hit is None or hit[0] != key:
            hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            _PACKED[self] = hit
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            Linear.cpu_prepack
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and min(w.shape) >= self.PREPACK_MIN_FEATURES
            and x.numel() <= self.PREPACK_MAX_ROWS * x.shape[-1]
            and not torch.is_grad_enabled()
            and not _cpu_autocast_enabled()
            and not _is_compiling()
        ):
            if _PREPACK["ok"] is None:
                _PREPACK["ok"] = _prepack_supported()
            if _PREPACK["ok"]:
                try:
                    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
                except (RuntimeError, TypeError, AttributeError) as e:  # a torch build without these kernels
                    _PREPACK["ok"] = False
                    warnings.warn(f"prepacked CPU linear unavailable ({e}); using F.linear", RuntimeWarning, stacklevel=2)
        return F.linear(x, w, self.bias)


_PREPACK: dict[str, bool | None] = {"ok": None}


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` whose backward reuses the boolean ``keep`` mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper random mask on the CPU.

    ``bernoulli_`` draws a float per element; here each element keeps its value when a 31-bit random
    integer is ``>= round(p * 2**31)`` (probability ``1 - p`` to within ``2**-31``, finer than a
    float32 uniform), then scales by ``1 / (1 - p)`` as ``F.dropout`` does -- about 2.5x faster on
    the CPU.  Other devices (fused kernels) and ``inplace`` use ``F.dropout``.  Random numbers come
    from the default generator, so runs are reproducible under ``torch.manual_seed``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # uniform in [0, 2**31)
        keep = bits >= int(round(self.p * 2**31))
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight^T`` against ``targets`` with one ``[M, V]`` buffer.

    The logits are normalised to log-probabilities in place and, in the backward pass, turned
    into their gradient ``(softmax - onehot) / M`` in place; the two ``[M, V]`` buffers that
    ``log_softmax`` + ``nll_loss`` allocate (and, on the CPU, page in) are never created.  The
    products run in the dtype autocast gives them, as ``F.linear`` under autocast would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, weight)  # autocast: the autocast dtype
        ctx.mm_dtype = logits.dtype
        logp = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        torch.log_softmax(logp, -1, out=logp)
        ctx.save_for_backward(x, weight, targets)
        ctx.logp = logp  # not saved through autograd: backward overwrites it
        return -logp.gather(1, targets[:, None]).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, targets = ctx.saved_tensors
        logp = ctx.logp
        if logp is None:
            raise RuntimeError("the LPD loss reuses its logits buffer: backward through it once (recompute the loss)")
        ctx.logp = None
        M = logp.shape[0]
        scale = grad / M
        g = logp.exp_().mul_(scale)
        g.index_put_((torch.arange(M, device=g.device), targets), -scale.expand(M), accumulate=True)
        g = g.to(ctx.mm_dtype)
        grad_x = g.mm(weight.to(ctx.mm_dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(x.to(ctx.mm_dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight).float(), targets)`` for ``x [M, D]``, ``weight [V, D]``
    (float64 inputs stay float64).

    With autograd it runs as :class:`_LinearCrossEntropy` (one ``[M, V]`` buffer, single backward);
    without, it is exactly the expression above.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    logits = F.linear(x, weight)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets)


class KVCache:
    """Static key/value cache of one attention layer: ``[B, heads, slots, head_dim]``, allocated once.

    Allocation is lazy (at the first :meth:`update`) so that it takes the dtype the keys actually
    have, e.g. bf16 under autocast.
    """

    def __init__(self, batch: int, num_heads: int, num_slots: int, head_dim: int, device: torch.device):
        self.shape = (batch, num_heads, num_slots, head_dim)
        self.device = device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def allocate(self, dtype: torch.dtype) -> None:
        """Allocate (zeroed) storage of ``dtype`` now; a no-op if it already has that dtype."""
        if self.k is None or self.k.dtype != dtype:
            self.k = torch.zeros(self.shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(self.shape, dtype=dtype, device=self.device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` into slots ``[start, start + T)``; return the cache's first ``kv_len`` slots."""
        self.allocate(k.dtype)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    def update_at(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write row ``t`` of ``k, v`` into slot ``index[t]`` (static shapes); return the whole cache.

        The storage must have been allocated (:meth:`allocate`) with the dtype of ``k``.
        """
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


class Attention(nn.Module):
    """Plain multi-head softmax attention (scale ``head_dim**-0.5``, qkv bias, no qk-norm)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        kv_len: int | None = None,
        *,
        last: int | None = None,
        write_pos: torch.Tensor | None = None,
        block_mask: Any = None,
    ) -> torch.Tensor:
        """Attention of ``x [B, T, C]``; with ``last``, only the last ``last`` rows are returned.

        Keys and values of all ``T`` rows are computed (and written to ``cache``: slots
        ``[start, start + T)``, or slots ``write_pos`` with static shapes).  ``attn_mask`` is a
        boolean ``[T, S]`` mask (True = may attend); ``block_mask`` a flex-attention ``BlockMask``
        for the rows returned (used instead of ``attn_mask``).
        """
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            if write_pos is not None:
                k, v = cache.update_at(write_pos, k, v)
            else:
                k, v = cache.update(start, k, v, kv_len if kv_len is not None else start + T)
        if last is not None and last < T:
            q = q[:, :, T - last :]
            if attn_mask is not None:
                attn_mask = attn_mask[T - last :]
            T = last
        if block_mask is not None:
            out = _flex_attention(q, k, v, block_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = Dropout(drop)

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

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        kv_len: int | None = None,
        *,
        last: int | None = None,
        write_pos: torch.Tensor | None = None,
        block_mask: Any = None,
    ) -> torch.Tensor:
        """One block; with ``last`` only the last ``last`` rows are computed past the key/value
        projection (the other rows still write their keys and values to ``cache``)."""
        h = self.attn(self.norm1(x), attn_mask, cache, start, kv_len, last=last, write_pos=write_pos, block_mask=block_mask)
        if last is not None and last < x.shape[1]:
            x = x[:, x.shape[1] - last :]
        x = x + h
        return x + self.mlp(self.norm2(x))


def group_ids(group_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Group numbers of the training sequence: ``(context [1 + N - g_{K-1}], queries [N])``.

    Context group 0 is the condition and context group ``k+1`` holds decoding group ``k``; a
    query's number is its decoding group.
    """
    sizes = torch.tensor(list(group_sizes), dtype=torch.long)
    K = len(sizes)
    ctx_group = torch.cat([torch.zeros(1, dtype=torch.long), torch.repeat_interleave(torch.arange(1, K), sizes[:-1])])
    qry_group = torch.repeat_interleave(torch.arange(K), sizes)
    return ctx_group, qry_group


def group_visible_mask(group_sizes: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean training mask ``[L, L]`` (True = may attend), ``L = 1 + 2N - g_{K-1}``.

    Rows/columns are the context stream (condition, then groups ``0..K-2``) followed by the query
    stream (groups ``0..K-1``); see the module docstring for the rules.
    """
    ctx_group, qry_group = group_ids(group_sizes)
    n_ctx = ctx_group.numel()
    L = n_ctx + qry_group.numel()
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[:n_ctx, :n_ctx] = ctx_group[None, :] <= ctx_group[:, None]
    mask[n_ctx:, :n_ctx] = ctx_group[None, :] <= qry_group[:, None]
    mask[n_ctx:, n_ctx:] = qry_group[None, :] == qry_group[:, None]
    return mask.to(device)


def group_block_mask(group_sizes: Sequence[int], device: torch.device | str, queries_only: bool = False) -> Any:
    """The training mask as a flex-attention ``BlockMask`` (block-sparse: fully masked 128 x 128
    tiles are skipped).  ``queries_only``: rows are the ``N`` queries only (for the last block)."""
    from torch.nn.attention.flex_attention import create_block_mask

    ctx_group, qry_group = group_ids(group_sizes)
    n_ctx = ctx_group.numel()
    gid = torch.cat([ctx_group, qry_group]).to(device)
    is_query = (torch.arange(gid.numel()) >= n_ctx).to(device)
    L = gid.numel()
    offset = n_ctx if queries_only else 0

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_idx = q_idx + offset
        same_query_group = is_query[q_idx] & (gid[kv_idx] == gid[q_idx])
        return torch.where(is_query[kv_idx], same_query_group, gid[kv_idx] <= gid[q_idx])

    return create_block_mask(mask_mod, None, None, L - offset, L, device=device)


class LPD(nn.Module):
    """Locality-aware parallel decoder (class-conditional transformer over VQ tokens)."""

    def __init__(self, config: LPDConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = config
        D, N = config.embed_dim, config.num_tokens
        self.num_tokens = N
        self.grid_size = config.grid_size
        self.vocab_size = config.vocab_size
        self.class_num = config.class_num
        self.label_drop_prob = config.label_drop_prob
        self.grad_checkpointing = config.grad_checkpointing

        self.class_emb = nn.Embedding(config.class_num, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.token_emb = nn.Embedding(config.vocab_size, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        self.z_proj_ln = nn.LayerNorm(D, eps=config.layernorm_eps)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, config.layernorm_eps, config.proj_dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=config.layernorm_eps)
        self.head = Linear(D, config.vocab_size, bias=False)
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._block_mask_cache: dict[tuple, tuple[Any, Any]] = {}
        self.set_attn_impl(attn_impl)
        if not any(p.is_meta for p in self.parameters()):
            self.initialize_weights()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation (truncated-normal-like std 0.02 embeddings, Xavier linears).

        With ``generator`` the weights depend only on it, so every process can build identical
        random models from one seed (``--random_init``).
        """

        def normal_(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std).clamp_(-2 * std, 2 * std))

        for t in (self.class_emb.weight, self.fake_latent, self.token_emb.weight, self.mask_token, self.pos_embed):
            normal_(t, 0.02)
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
        """Attention kernel of the training pass (:meth:`logits`, :meth:`forward`).

        ``'sdpa'``: ``F.scaled_dot_product_attention`` with the cached boolean mask; ``'flex'``:
        flex attention with a cached block-sparse ``BlockMask`` (compiled on CUDA; elsewhere torch's
        eager reference, forward only -- for checks, not speed); ``'auto'`` (default): flex on CUDA
        when the installed torch has it, else SDPA.  Decoding always uses SDPA.
        """
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if attn_impl == "flex" and not flex_attention_available():
            raise ValueError(
                f"attn_impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); this is "
                f"torch {torch.__version__}: use attn_impl='sdpa' or 'auto'"
            )
        self.attn_impl = attn_impl

    def uses_flex(self, device: torch.device | str) -> bool:
        """Whether the training pass on ``device`` runs flex attention (see :meth:`set_attn_impl`)."""
        if self.attn_impl == "flex":
            return True
        return self.attn_impl == "auto" and torch.device(device).type == "cuda" and flex_attention_available()

    def group_block_masks(self, group_sizes: Sequence[int], device: torch.device) -> tuple[Any, Any]:
        """Flex ``BlockMask`` s of a schedule (all rows, query rows only), built once and cached."""
        key = (tuple(group_sizes), str(device))
        masks = self._block_mask_cache.get(key)
        if masks is None:
            masks = (group_block_mask(group_sizes, device), group_block_mask(group_sizes, device, queries_only=True))
            self._block_mask_cache[key] = masks
        return masks

    def group_mask(self, group_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
        """The training mask for a schedule, built once per (schedule, device) and cached."""
        key = (tuple(group_sizes), str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = group_visible_mask(group_sizes, device)
            self._mask_cache[key] = mask
        return mask

    # ------------------------------------------------------------------ inputs
    def _check_inputs(
        self, tokens: torch.Tensor | None, labels: torch.Tensor | None, orders: torch.Tensor, group_sizes: Sequence[int]
    ) -> list[int]:
        N = self.num_tokens
        sizes = validate_group_sizes(group_sizes, N)
        if orders.dim() != 2 or orders.shape[1] != N:
            raise ValueError(f"orders must have shape [B, {N}] for a {self.grid_size}x{self.grid_size} grid, got {list(orders.shape)}")
        B = orders.shape[0]
        if tokens is not None:
            if tokens.dim() == 3:
                tokens = tokens.reshape(tokens.shape[0], -1)
            if tokens.shape != (B, N):
                raise ValueError(f"tokens must have shape [{B}, {N}] (raster order), got {list(tokens.shape)}")
        if labels is not None and labels.shape != (B,):
            raise ValueError(f"labels must have shape [{B}], got {list(labels.shape)}")
        return sizes

    def embed_condition(self, labels: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition embeddings ``[B, D]``: class embeddings, or ``fake_latent`` where ``labels`` is None / dropped."""
        fake = self.fake_latent.expand(batch, -1)
        if labels is None:
            return fake
        cond = self.class_emb(labels)
        if drop is not None:
            cond = torch.where(drop[:, None], fake.to(cond.dtype), cond)
        return cond

    def position_embeddings(self, orders: torch.Tensor) -> torch.Tensor:
        """Position embeddings of the raster positions ``orders`` ``[B, N]`` -> ``[B, N, D]``."""
        return self.pos_embed[0, 1:][orders]

    def _train_sequence(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor, sizes: list[int], drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N = orders.shape
        tokens = tokens.reshape(B, N)
        tok_gen = torch.gather(tokens, 1, orders)
        pos = self.position_embeddings(orders)
        n_ctx = N - sizes[-1]
        first = (self.embed_condition(labels, B, drop) + self.pos_embed[0, 0]).unsqueeze(1)
        ctx = self.token_emb(tok_gen[:, :n_ctx]) + pos[:, :n_ctx]
        queries = self.mask_token + pos
        x = self.z_proj_ln(torch.cat([first, ctx, queries], dim=1))
        return x, tok_gen

    def _run_blocks(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All blocks of the training pass; returns the outputs of the ``N`` queries only (the last
        block skips everything but keys and values for the context rows)."""
        N = self.num_tokens
        mask: torch.Tensor | None = None
        block_masks: tuple[Any, Any] = (None, None)
        if self.uses_flex(x.device):
            if x.device.type == "cpu" and x.requires_grad:
                raise RuntimeError(
                    "attn_impl='flex' has no backward pass on the CPU (torch's flex attention is "
                    "forward-only there); train on a CPU with attn_impl='sdpa' or 'auto'"
                )
            block_masks = self.group_block_masks(sizes, x.device)
        else:
            mask = self.group_mask(sizes, x.device)
        last_index = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            kw: dict[str, Any] = {"last": N, "block_mask": block_masks[1]} if i == last_index else {"block_mask": block_masks[0]}
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False, **kw)
            else:
                x = blk(x, mask, **kw)
        return x

    # ------------------------------------------------------------------ training pass
    def logits(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor, group_sizes: Sequence[int]
    ) -> torch.Tensor:
        """Logits ``[B, N, V]`` of ``tokens[b, orders[b, j]]`` at index ``j`` (generation order); no label dropout.

        ``labels=None`` conditions every sample on ``fake_latent`` (the unconditional branch).
        """
        sizes = self._check_inputs(tokens, labels, orders, group_sizes)
        x, _ = self._train_sequence(tokens, labels, orders, sizes, None)
        return self.head(self.norm(self._run_blocks(x, sizes)))

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None,
        orders: torch.Tensor,
        group_sizes: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of predicting every token; label dropout (``label_drop_prob``) in train mode."""
        sizes = self._check_inputs(tokens, labels, orders, group_sizes)
        drop = None
        if self.training and labels is not None and self.label_drop_prob > 0:
            u = torch.rand(labels.shape[0], generator=generator, device=generator.device if generator is not None else labels.device)
            drop = u.to(labels.device) < self.label_drop_prob
        x, targets = self._train_sequence(tokens, labels, orders, sizes, drop)
        h = self.norm(self._run_blocks(x, sizes))
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1))

    # ------------------------------------------------------------------ cached decoding
    def new_caches(self, batch: int, device: torch.device, num_slots: int | None = None) -> list[KVCache]:
        """One static cache per block with ``1 + N`` slots (slot 0: the condition), or ``num_slots``."""
        cfg = self.config
        slots = self.num_tokens + 1 if num_slots is None else num_slots
        return [KVCache(batch, cfg.num_heads, slots, cfg.embed_dim // cfg.num_heads, device) for _ in range(cfg.depth)]

    def forward_cached(
        self,
        x: torch.Tensor,
        caches: list[KVCache],
        start: int,
        kv_len: int,
        attn_mask: torch.Tensor | None,
        num_out: int,
    ) -> torch.Tensor:
        """Run already-embedded inputs ``x`` (after ``z_proj_ln``) that occupy cache slots
        ``[start, start + T)``, attending over slots ``[0, kv_len)``; return the head outputs of the
        last ``num_out`` inputs."""
        last_index = len(self.blocks) - 1
        for i, (blk, cache) in enumerate(zip(self.blocks, caches)):
            x = blk(x, attn_mask, cache, start, kv_len, last=num_out if i == last_index else None)
        return self.head(self.norm(x[:, -num_out:]))

    def forward_static(
        self,
        x: torch.Tensor,
        caches: list[KVCache],
        write_pos: torch.Tensor,
        attn_mask: torch.Tensor,
        num_out: int,
    ) -> torch.Tensor:
        """A decoding step with static shapes (the form ``torch.compile`` turns into one graph).

        Row ``t`` of the embedded inputs ``x [B, T, D]`` writes its keys/values into cache slot
        ``write_pos[t]``; every row attends over the whole (pre-allocated) cache through the
        boolean ``attn_mask [T, S]``.  Returns the head outputs of the last ``num_out`` rows.
        """
        last_index = len(self.blocks) - 1
        for i, (blk, cache) in enumerate(zip(self.blocks, caches)):
            x = blk(x, attn_mask, cache, write_pos=write_pos, last=num_out if i == last_index else None)
        return self.head(self.norm(x[:, -num_out:]))

    # ------------------------------------------------------------------ optimisation helpers
    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups of the released recipe: weight decay on everything except biases,
        norms and other 1-D parameters (spec section 6)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
