"""The demo's exact, training-free tokenizer with the VQ tokenizer's interface: each ``patch x patch``
block becomes the index of the nearest of ``levels`` evenly spaced greys (0 = black) to its mean; ``encode(decode(t)) == t``.
The checks of both tokenizers' inputs live here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpd.config import check_positive

DEFAULT_LEVELS = 4


def check_images(images: Tensor, f: int) -> Tensor:
    """``images`` if float ``[B, 3, H, W]`` with H and W positive multiples of ``f``, else the error."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a floating-point tensor in [-1, 1], got {type(images).__name__}"
        )
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    _, c, h, w = images.shape
    if c != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}"
        )
    if h % f or w % f or not h or not w:
        raise ValueError(
            f"image height and width must be positive multiples of the downsampling factor {f}, "
            f"got {h}x{w}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor in [-1, 1] (convert uint8 with "
            f"uint8_to_images), got dtype {images.dtype}"
        )
    return images


def check_tokens(tokens: Tensor, vocab: int, device: torch.device) -> Tensor:
    """Integer ids ``[B, h, w]`` (or raster ``[B, h*w]``) in ``[0, vocab)`` as long on ``device``."""
    dtype = getattr(tokens, "dtype", type(tokens).__name__)
    bad = not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex()
    if bad or dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of codebook indices, got dtype {dtype}")
    if tokens.dim() == 2:
        side = math.isqrt(tokens.shape[1])
        if not side or side * side != tokens.shape[1]:
            raise ValueError(
                f"flat tokens [B, N] need a square grid, got N = {tokens.shape[1]}; pass [B, h, w]"
            )
        tokens = tokens.reshape(-1, side, side)
    elif tokens.dim() != 3 or 0 in tokens.shape[1:]:
        raise ValueError(f"tokens must have shape [B, h, w] or [B, h*w], got {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(
            f"token indices must lie in [0, {vocab - 1}], got values in "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )
    return tokens.to(device=device, dtype=torch.long)


class PaletteTokenizer(nn.Module):
    """``levels`` greys (the vocabulary) over ``patch``-pixel blocks; no parameters, the palette a buffer."""

    palette: Tensor

    def __init__(self, levels: int = DEFAULT_LEVELS, patch: int = 16) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 65536:
            raise ValueError(f"levels must be an integer in [2, 65536], got {levels!r}")
        check_positive(patch, "patch", ValueError)
        self.levels = self.codebook_size = levels
        self.patch = self.downsample_factor = patch
        self.register_buffer("palette", torch.linspace(-1.0, 1.0, levels), persistent=False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Float images ``[B, 3, H, W]`` in ``[-1, 1]`` -> tokens ``[B, H/patch, W/patch]`` (ties go darker)."""
        x = check_images(images, self.patch).to(self.palette.device, torch.float32)
        if x.numel() and not (x.isfinite().all() and x.min() >= -1.001 and x.max() <= 1.001):
            raise ValueError("images must be finite and lie in [-1, 1]")
        means = F.avg_pool2d(x.mean(dim=1, keepdim=True), self.patch)[:, 0]
        return (means.unsqueeze(-1) - self.palette).abs().argmin(dim=-1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens ``[B, h, w]`` (or raster ``[B, N]``, ``N`` square) -> flat grey blocks ``[B, 3, patch*h, patch*w]``."""
        tokens = check_tokens(tokens, self.levels, self.palette.device)
        grey = (
            self.palette[tokens].repeat_interleave(self.patch, -2).repeat_interleave(self.patch, -1)
        )
        return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def images_to_uint8(images: Tensor) -> Tensor:
    """Float images in ``[-1, 1]`` -> uint8 as the released sampling code rounds them; shape kept."""
    return ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)


def uint8_to_images(images: Tensor) -> Tensor:
    """uint8 images -> float32 in ``[-1, 1]``."""
    if images.dtype != torch.uint8:
        raise TypeError("images must be a torch.uint8 tensor")
    return images.float() / 127.5 - 1.0
