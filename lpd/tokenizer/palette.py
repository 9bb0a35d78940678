"""The demo's exact, training-free tokenizer with the VQ tokenizer's interface: each ``patch x patch``
block becomes the index of the nearest of ``levels`` evenly spaced greys (0 = black) to its mean; ``encode(decode(t)) == t``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_LEVELS = 4


class PaletteTokenizer(nn.Module):
    """``levels`` greys (the vocabulary) over ``patch``-pixel blocks; no parameters, the palette a buffer."""

    palette: Tensor

    def __init__(self, levels: int = DEFAULT_LEVELS, patch: int = 16) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 65536:
            raise ValueError(f"levels must be an integer in [2, 65536], got {levels!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be a positive integer, got {patch!r}")
        self.levels = self.codebook_size = levels
        self.patch = self.downsample_factor = patch
        self.register_buffer("palette", torch.linspace(-1.0, 1.0, levels), persistent=False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Float images ``[B, 3, H, W]`` in ``[-1, 1]`` -> tokens ``[B, H/patch, W/patch]`` (ties go darker)."""
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError(
                "images must be a floating-point tensor in [-1, 1] (convert uint8 with uint8_to_images)"
            )
        h, w = images.shape[-2:] if images.dim() == 4 else (0, 0)
        if (
            images.dim() != 4
            or images.shape[1] != 3
            or not h
            or not w
            or h % self.patch
            or w % self.patch
        ):
            raise ValueError(
                f"images must have shape [B, 3, H, W] with H, W positive multiples of patch={self.patch}, "
                f"got {tuple(images.shape)}"
            )
        x = images.to(self.palette.device, torch.float32)
        if x.numel() and not (x.isfinite().all() and x.min() >= -1.001 and x.max() <= 1.001):
            raise ValueError("images must be finite and lie in [-1, 1]")
        means = F.avg_pool2d(x.mean(dim=1, keepdim=True), self.patch)[:, 0]
        return (means.unsqueeze(-1) - self.palette).abs().argmin(dim=-1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens ``[B, h, w]`` (or raster ``[B, N]``, ``N`` square) -> flat grey blocks ``[B, 3, patch*h, patch*w]``."""
        dtype = getattr(tokens, "dtype", type(tokens).__name__)
        bad = not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex()
        if bad or dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {dtype}")
        if tokens.dim() == 2 and math.isqrt(tokens.shape[1]) ** 2 == tokens.shape[1]:
            tokens = tokens.reshape(len(tokens), math.isqrt(tokens.shape[1]), -1)
        if tokens.dim() != 3 or not tokens.shape[1] or not tokens.shape[2]:
            raise ValueError(
                f"tokens must have shape [B, h, w] or [B, N] with N a positive square, got {tuple(tokens.shape)}"
            )
        tokens = tokens.to(self.palette.device, torch.long)
        if tokens.numel() and not (0 <= tokens.min() and tokens.max() < self.levels):
            raise ValueError(
                f"tokens must lie in [0, {self.levels}) for levels={self.levels}, "
                f"got values in [{tokens.min()}, {tokens.max()}]"
            )
        values = self.palette[tokens].repeat_interleave(self.patch, -2)
        return (
            values.repeat_interleave(self.patch, -1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        )


def images_to_uint8(images: Tensor) -> Tensor:
    """Float images in ``[-1, 1]`` -> uint8 as the released sampling code rounds them; shape kept."""
    return ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)


def uint8_to_images(images: Tensor) -> Tensor:
    """uint8 images -> float32 in ``[-1, 1]``."""
    if images.dtype != torch.uint8:
        raise TypeError("images must be a torch.uint8 tensor")
    return images.float() / 127.5 - 1.0
