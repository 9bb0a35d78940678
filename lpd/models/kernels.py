"""Drop-in kernels of the LPD transformer: a CPU-prepacked :class:`Linear`, a cheaper CPU
:class:`Dropout`, a one-buffer :func:`linear_cross_entropy` and :func:`flex_attention`."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Linear", "Dropout", "linear_cross_entropy", "flex_attention"]

# Packed weights are kept outside the module: oneDNN's opaque tensors cannot be copied or saved.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Tensor]] = weakref.WeakKeyDictionary()


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference (<= 256 rows, >= 512 wide, no autograd, autocast
    or compile) uses a prepacked oneDNN weight (``Linear.cpu_prepack = False``: not)."""

    cpu_prepack: bool = torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        fast = Linear.cpu_prepack and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
        fast = fast and min(w.shape) >= 512 and x.numel() <= 256 * x.shape[-1]
        fast = fast and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        if fast and not torch.compiler.is_compiling():
            key = (w.data_ptr(), w._version)  # re-pack when the weight changes
            hit = _PACKED.get(self)
            if hit is None or hit[0] != key:
                hit = _PACKED[self] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            return torch.ops.mkldnn._linear_pointwise(x, hit[1], self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` whose backward reuses the boolean ``keep``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` that on the CPU keeps an element where a random int31 is ``>= p * 2**31``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= int(round(self.p * 2**31))
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight^T``: log-softmax in place, its gradient in place."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        logits = F.linear(x, weight)  # the autocast dtype under autocast
        ctx.mm_dtype = logits.dtype
        logp = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        torch.log_softmax(logp, -1, out=logp)
        ctx.save_for_backward(x, weight, targets)
        ctx.logp = logp  # kept outside autograd: backward overwrites it
        return -logp.gather(1, targets[:, None]).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, targets = ctx.saved_tensors
        if ctx.logp is None:
            raise RuntimeError("the LPD loss reuses its logits buffer: backward through it once")
        g, ctx.logp = ctx.logp, None
        M, scale = g.shape[0], grad / g.shape[0]
        g = g.exp_().mul_(scale)  # (softmax - onehot) / M
        g.index_put_((torch.arange(M, device=g.device), targets), -scale.expand(M), accumulate=True)
        g = g.to(ctx.mm_dtype)
        grad_x = g.mm(weight.to(ctx.mm_dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = g.t().mm(x.to(ctx.mm_dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight).float(), targets)`` of ``x [M, D]``, one buffer."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets)
    logits = F.linear(x, weight)
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets)


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    """Flex attention: the compiled block-sparse kernel on CUDA, the eager reference elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return (_compiled_flex() if q.device.type == "cuda" else flex)(q, k, v, block_mask=block_mask)
