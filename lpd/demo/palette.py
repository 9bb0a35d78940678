"""A palette tokenizer: the exact, training-free stand-in for the VQ tokenizer used by the CPU demo.

Each ``patch x patch`` block of an image becomes one token, the index of the nearest of
``levels`` evenly spaced grey intensities (``-1`` = black = token 0, ``+1`` = white = token
``levels - 1``) to the block's mean over pixels and RGB channels. Decoding paints every token
back as a flat grey block. It has the same interface as the LlamaGen VQ tokenizer
(:mod:`lpd.tokenizer`): images are RGB floats in ``[-1, 1]``,
``encode(images [B, 3, H, W]) -> LongTensor [B, H/16, W/16]``,
``decode(tokens [B, h, w]) -> FloatTensor [B, 3, 16h, 16w]``, with ``codebook_size`` and
``downsample_factor``, so the sampler, the evaluation path and the training loop can use it
unchanged, and its vocabulary is only ``levels`` tokens.

Round trips are exact: ``decode(encode(x)) == x`` for every palette image (one made of flat
blocks of palette intensities) and ``encode(decode(t)) == t`` for every token grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F

__all__ = ["DEFAULT_LEVELS", "PaletteTokenizer", "images_to_uint8", "uint8_to_images"]

#: Default number of grey levels; the demo's LPD model then has ``vocab_size = 4``.
DEFAULT_LEVELS = 4

# Images a little outside [-1, 1] (float rounding in a decoder) are still accepted.
_RANGE_TOLERANCE = 1e-3


class PaletteTokenizer(nn.Module):
    """Map ``patch x patch`` pixel blocks to one of ``levels`` grey intensities and back.

    Args:
        levels: number of grey intensities, i.e. the vocabulary (``codebook_size``); >= 2.
        patch: side of the pixel block behind one token (``downsample_factor``); 16 matches
            the VQ tokenizer, so a 16x16 token grid decodes to 256 px.

    The module has no parameters. Its palette is a non-persistent buffer, so ``.to(device)``
    moves it and ``state_dict()`` is empty; inputs are moved to the module's device and
    outputs live there.
    """

    palette: Tensor

    def __init__(self, levels: int = DEFAULT_LEVELS, patch: int = 16) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 65536:
            raise ValueError(f"levels must be an integer in [2, 65536], got {levels!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be a positive integer, got {patch!r}")
        self.levels = levels
        self.patch = patch
        self.register_buffer(
            "palette", torch.linspace(-1.0, 1.0, levels, dtype=torch.float32), persistent=False
        )

    @property
    def codebook_size(self) -> int:
        """Number of distinct tokens (the LPD model's ``vocab_size``)."""
        return self.levels

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side."""
        return self.patch

    def extra_repr(self) -> str:
        return f"levels={self.levels}, patch={self.patch}"

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Tokenise RGB images.

        Args:
            images: float tensor ``[B, 3, H, W]`` in ``[-1, 1]``, ``H`` and ``W`` multiples of
                ``patch``.

        Returns:
            LongTensor ``[B, H / patch, W / patch]``: for each block, the index of the palette
            intensity nearest to the block's mean (ties go to the darker level).
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in [-1, 1], got dtype {images.dtype} "
                "(convert uint8 images with lpd.demo.palette.uint8_to_images)"
            )
        height, width = images.shape[-2:]
        if height % self.patch or width % self.patch or height == 0 or width == 0:
            raise ValueError(
                f"image height and width must be positive multiples of patch={self.patch}, "
                f"got {height}x{width}"
            )
        x = images.to(device=self.palette.device, dtype=torch.float32)
        if x.numel():
            lo, hi = x.min().item(), x.max().item()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("images contain NaN or infinite values")
            if lo < -1.0 - _RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
                raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
        means = F.avg_pool2d(x.mean(dim=1, keepdim=True), self.patch)[:, 0]  # [B, h, w]
        return (means.unsqueeze(-1) - self.palette).abs().argmin(dim=-1)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Paint token grids as flat grey blocks.

        Args:
            tokens: integer tensor ``[B, h, w]``, or ``[B, N]`` in raster order with ``N`` a
                perfect square, values in ``[0, levels)``.

        Returns:
            FloatTensor ``[B, 3, patch * h, patch * w]`` in ``[-1, 1]``.
        """
        tokens = self._check_tokens(tokens)
        values = self.palette[tokens]  # [B, h, w]
        p = self.patch
        values = values.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        return values.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() == 2:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1] or side == 0:
                raise ValueError(
                    f"flat tokens [B, N] need N to be a positive perfect square, got N={tokens.shape[1]}"
                )
            tokens = tokens.reshape(tokens.shape[0], side, side)
        elif tokens.dim() != 3:
            raise ValueError(
                f"tokens must have shape [B, h, w] or [B, N] (N square), got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] == 0 or tokens.shape[2] == 0:
            raise ValueError(f"token grids must be non-empty, got {tuple(tokens.shape)}")
        tokens = tokens.to(device=self.palette.device, dtype=torch.long)
        if tokens.numel():
            lo, hi = tokens.min().item(), tokens.max().item()
            if lo < 0 or hi >= self.levels:
                raise ValueError(
                    f"tokens must lie in [0, {self.levels}) for levels={self.levels}, "
                    f"got values in [{lo}, {hi}]"
                )
        return tokens


def images_to_uint8(images: Tensor) -> Tensor:
    """Convert float images in ``[-1, 1]`` to uint8 ``[0, 255]`` as the released sampling code
    does: ``round(clip((x + 1) / 2 * 255, 0, 255))``. Shape and device are kept."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("images must be a floating-point torch.Tensor in [-1, 1]")
    return ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)


def uint8_to_images(images: Tensor) -> Tensor:
    """Convert uint8 images ``[0, 255]`` to float32 in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise TypeError("images must be a torch.uint8 tensor")
    return images.float() / 127.5 - 1.0
