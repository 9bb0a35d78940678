"""The LlamaGen VQ-16 tokenizer (``vq_ds16_c2i.pt``): images <-> LPD's discrete tokens.

A VQGAN-style conv encoder / decoder (GroupNorm of 32 groups, eps 1e-6; SiLU) with an l2-normalised
nearest-code quantizer between; module and buffer names are the released file's, so it loads unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lpd.config import check_positive
from lpd.files import load_into, load_state_dict
from lpd.tokenizer.palette import check_images, check_tokens


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) x 2 plus the input (through a 1x1 ``nin_shortcut`` if widths differ)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), _conv3(c_in, c_out)
        self.norm2, self.conv2 = _norm(c_out), _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (width C, scale C**-0.5), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (f(hn).reshape(b, 1, c, h * w).mT for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.proj_out(out.mT.reshape(b, c, h, w))


class _Resample(nn.Module):
    """x2 down (zero-pad bottom/right by one, 3x3 stride-2 conv) or x2 up (nearest, 3x3 conv)."""

    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = _conv3(channels, channels) if up else nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up
        return self.conv(F.interpolate(x, scale_factor=2.0) if up else F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution: ``res`` blocks, each followed by an ``attn`` block when ``with_attn``, then ``resample``."""

    def __init__(self, c_in: int, c_out: int, blocks: int, with_attn: bool, resample: str | None):
        super().__init__()
        self.res, self.attn = nn.ModuleList(), nn.ModuleList()
        for i in range(blocks):
            self.res.append(ResnetBlock(c_in if i == 0 else c_out, c_out))
            if with_attn:
                self.attn.append(AttnBlock(c_out))
        self.resample = resample  # the released names: 'downsample' (encoder), 'upsample' (decoder)
        if resample:
            self.add_module(resample, _Resample(c_out, up=resample == "upsample"))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = self.attn[i](res(h)) if self.attn else res(h)
        return getattr(self, self.resample)(h) if self.resample else h


def _mid(c: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c))


class _Coder(nn.Module):
    """The encoder: image ``[B, 3, H, W]`` -> latent ``[B, z_channels, H/f, W/f]``, ``f = 2 **
    (len(ch_mult) - 1)``, highest resolution first; ``up``: the decoder, its mirror image."""

    def __init__(self, ch: int, ch_mult: Sequence[int], blocks: int, z_channels: int, up: bool):
        super().__init__()
        self.up, n, widths = up, len(ch_mult), [ch * m for m in ch_mult]
        widths = [widths[-1], *reversed(widths)] if up else [ch, *widths]
        self.conv_in = _conv3(z_channels if up else 3, widths[0])
        if up:
            self.mid = _mid(widths[0])
        self.conv_blocks = nn.Sequential()
        for i, level in enumerate(reversed(range(n)) if up else range(n)):
            resample = None if level == (0 if up else n - 1) else "upsample" if up else "downsample"
            block = _Level(widths[i], widths[i + 1], blocks + up, level == n - 1, resample)
            self.conv_blocks.append(block)
        if not up:
            self.mid = _mid(widths[-1])
        c, c_out = widths[-1], 3 if up else z_channels
        self.norm_out, self.conv_out = _norm(c), _conv3(c, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        x = self.conv_blocks(self.mid(x)) if self.up else self.mid(self.conv_blocks(x))
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Nearest code of ``embedding.weight`` ``[codebook_size, dim]`` (both sides l2-normalised when ``l2_norm``)."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool = True) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # the original's usage log, for strict loading
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, h, w]`` of the codes nearest to latents ``[B, dim, h, w]``."""
        b, c, h, w = z.shape
        flat, codes = z.permute(0, 2, 3, 1).reshape(-1, c), self.codebook()
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        # |z|^2 + |e|^2 - 2 z.e, the released formula, so that near-ties resolve the same way.
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2.0 * (flat @ codes.t())
        return d.argmin(dim=1).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` ``[B, h, w]`` as a latent ``[B, dim, h, w]``."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] <-> ids ``[B, H/f, W/f]``; inputs move to the module's device.
    Randomly initialised; the defaults are the VQ-16 of ``vq_ds16_c2i.pt``."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        num_res_blocks: int = 2,
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or min(ch_mult) <= 0:
            raise ValueError(
                f"ch_mult must be a non-empty sequence of positive integers, got {ch_mult}"
            )
        names = ("ch", "z_channels", "codebook_size", "codebook_embed_dim", "num_res_blocks")
        sizes = (ch, z_channels, codebook_size, codebook_embed_dim, num_res_blocks)
        for name, val in zip(names, sizes):
            check_positive(val, name, ValueError)
        if any(ch * m % 32 for m in ch_mult):
            raise ValueError(
                f"every level width ch * mult must be a multiple of 32 (GroupNorm groups); "
                f"got {sorted({ch * m for m in ch_mult})}"
            )
        self.codebook_size = codebook_size
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = _Coder(ch, ch_mult, num_res_blocks, z_channels, up=False)
        self.decoder = _Coder(ch, ch_mult, num_res_blocks, z_channels, up=True)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, bool(codebook_l2_norm))
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, kernel_size=1)

    def encode_to_quant(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (quantized latent: the codes themselves, no straight-through gradient; ids)."""
        images = check_images(images, self.downsample_factor).to(self.quant_conv.weight)
        indices = self.quantize.nearest(self.quant_conv(self.encoder(images)))
        return self.quantize.lookup(indices), indices

    def decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent ``[B, dim, h, w]`` -> images ``[B, 3, f*h, f*w]``, not clamped."""
        return self.decoder(self.post_quant_conv(quant))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1], H and W multiples of ``f`` -> long ids ``[B, H/f, W/f]``."""
        return self.encode_to_quant(images)[1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, h, w]`` (or ``[B, h*w]``, square, raster) -> images ``[B, 3, f*h, f*w]``, not clamped."""
        tokens = check_tokens(tokens, self.codebook_size, self.quant_conv.weight.device)
        return self.decode_quant(self.quantize.lookup(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the nearest codes."""
        return self.decode_quant(self.encode_to_quant(images)[0])


build_vq = VQModel  # a randomly initialised VQ tokenizer


def load_vq(path: str | os.PathLike, map_location: str | torch.device = "cpu", **config) -> VQModel:
    """:func:`build_vq` with ``config``, loaded strictly from ``path`` (``{'model': state_dict}`` or a bare
    state dict, read with ``weights_only=True``), in eval mode on ``map_location``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VQ checkpoint {os.fspath(path)!r} not found; download vq_ds16_c2i.pt from the "
            f"Hugging Face repo FoundationVision/LlamaGen (see tokenizers/README.md)"
        )
    model, source = build_vq(**config), f"VQ checkpoint {os.fspath(path)!r}"
    hint = "pass the tokenizer's architecture with --vq_config"
    load_into(model, load_state_dict(path, map_location), source=source, hint=hint)
    return model.to(map_location).eval()
