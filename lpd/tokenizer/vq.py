"""The LlamaGen VQ-16 image tokenizer (``vq_ds16_c2i.pt``), written to load the released file unchanged.

LPD generates discrete tokens; this module turns images into those tokens and back. It is a
convolutional encoder / decoder (VQGAN lineage, as in LlamaGen) with a vector quantizer between:

* **Encoder**: ``conv_in`` -> one ``conv_blocks[i]`` per channel multiplier (``num_res_blocks``
  residual blocks; self-attention after every residual block at the last, lowest-resolution level
  only; a stride-2 ``downsample`` after every level but the last) -> ``mid`` (res, attn, res) ->
  GroupNorm, SiLU, ``conv_out`` to ``z_channels``. Down-sampling factor ``2 ** (len(ch_mult) - 1)``.
* ``quant_conv`` (1x1, ``z_channels`` -> ``codebook_embed_dim``), then the **quantizer**: with
  ``codebook_l2_norm`` both latents and codes are l2-normalised and each latent takes the code at
  the smallest squared Euclidean distance. The quantized latent is the (normalised) code itself.
* ``post_quant_conv`` (1x1, back to ``z_channels``), then the **decoder**: ``conv_in`` -> ``mid``
  -> ``conv_blocks`` from the lowest resolution up (``num_res_blocks + 1`` residual blocks each,
  attention only in the first, lowest-resolution one; nearest-neighbour x2 ``upsample`` + 3x3 conv
  after every level but the last) -> GroupNorm, SiLU, ``conv_out`` to RGB.

Details that must match the released weights bit for bit (names and formulas):
GroupNorm has 32 groups and eps 1e-6; the non-linearity is SiLU; the down-sampling conv is a
3x3 stride-2 conv with **no padding, after zero-padding one row/column on the bottom/right only**;
the attention block is single-head over all ``h*w`` positions with 1x1-conv ``q``/``k``/``v``/
``proj_out`` and scale ``channels ** -0.5``; the decoder's ``conv_blocks.0`` is the *lowest*
resolution (the list is stored in decoding order, not by level). The quantizer carries a
``codebook_used`` buffer of 65536 floats (a training-time usage log); it is unused here but is part
of the state dict, so strict loading needs it.

Public API: :func:`build_vq`, :func:`load_vq`, :class:`VQModel` with ``encode`` / ``decode``
(indices <-> images in ``[-1, 1]``) and ``encode_to_quant`` / ``decode_quant`` (latents).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VQModel", "VectorQuantizer", "Encoder", "Decoder", "build_vq", "load_vq", "load_vq_state_dict"]

CODEBOOK_USAGE_BUFFER_SIZE = 65536  # length of LlamaGen's ``quantize.codebook_used`` buffer


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2, 1x1 ``nin_shortcut`` if widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head whose width is all C channels.
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)  # softmax(q k^T / sqrt(C)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (possibly none) and an optional resampler.

    Attribute names (``res``, ``attn``, ``downsample`` / ``upsample``) are the checkpoint's key names.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for i in range(num_blocks):
            self.res.append(ResnetBlock(in_channels if i == 0 else out_channels, out_channels))
            if with_attn:
                self.attn.append(AttnBlock(out_channels))

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> latent ``[B, z_channels, H/f, W/f]`` with ``f = 2 ** (len(ch_mult) - 1)``."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blk = _Level(block_in, block_out, num_res_blocks, with_attn=(level == n - 1))
            if level != n - 1:
                blk.downsample = Downsample(block_out)
            self.conv_blocks.append(blk)
            block_in = block_out
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            h = blk.blocks(h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, 3, f*h, f*w]``; ``conv_blocks[0]`` is the lowest resolution."""

    def __init__(
        self,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            block_out = ch * ch_mult[level]
            blk = _Level(block_in, block_out, num_res_blocks + 1, with_attn=(level == n - 1))
            if level != 0:
                blk.upsample = Upsample(block_out)
            self.conv_blocks.append(blk)
            block_in = block_out
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for blk in self.conv_blocks:
            h = blk.blocks(h)
            if hasattr(blk, "upsample"):
                h = blk.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer over ``embedding.weight`` [codebook_size, dim]; optionally l2-normalised."""

    def __init__(self, codebook_size: int, dim: int, l2_norm: bool = True) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        # Training-time usage log of the original code; kept only so the released state dict loads strictly.
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_BUFFER_SIZE))

    def codebook(self) -> torch.Tensor:
        """The codes as used for lookup: ``[codebook_size, dim]`` (l2-normalised when ``l2_norm``)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, h, w]`` of the nearest codes to latents ``z`` ``[B, dim, h, w]``."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.codebook()
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        # Squared distance |z|^2 + |e|^2 - 2 z.e, in this form (as the released model computes it),
        # so that near-ties resolve the same way.
        d = flat.pow(2).sum(dim=1, keepdim=True) + codes.pow(2).sum(dim=1) - 2.0 * (flat @ codes.t())
        return d.argmin(dim=1).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` ``[B, h, w]`` as a channel-first latent ``[B, dim, h, w]``."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: ``encode`` images -> code indices, ``decode`` indices -> images.

    State-dict keys: ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
    ``quantize.embedding.weight``, ``quantize.codebook_used``. Inputs are moved to the module's
    device (and images to its floating dtype); nothing assumes CUDA.
    """

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
        if len(ch_mult) < 1 or any(m <= 0 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive integers, got {ch_mult}")
        for name, val in (("ch", ch), ("z_channels", z_channels), ("codebook_size", codebook_size),
                          ("codebook_embed_dim", codebook_embed_dim), ("num_res_blocks", num_res_blocks)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        for width in {ch * m for m in ch_mult}:
            if width % 32 != 0:
                raise ValueError(f"every level width ch * mult must be a multiple of 32 (GroupNorm groups); got {width}")
        self.config: dict[str, Any] = dict(
            ch=ch, ch_mult=ch_mult, z_channels=z_channels, codebook_size=codebook_size,
            codebook_embed_dim=codebook_embed_dim, codebook_l2_norm=bool(codebook_l2_norm),
            num_res_blocks=num_res_blocks,
        )
        self.codebook_size = codebook_size
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.decoder = Decoder(z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, l2_norm=bool(codebook_l2_norm))
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, kernel_size=1)

    # ------------------------------------------------------------------ helpers
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = self.quant_conv.weight
        return p.device, p.dtype

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        b, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 (RGB) channels in dim 1, got {c} (shape {tuple(images.shape)})")
        f = self.downsample_factor
        if h % f != 0 or w % f != 0 or h == 0 or w == 0:
            raise ValueError(
                f"image height and width must be positive multiples of the downsampling factor {f}, got {h}x{w}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        device, dtype = self._device_dtype()
        return images.to(device=device, dtype=dtype)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor [B, h, w] or [B, h*w], got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor of codebook indices, got dtype {tokens.dtype}")
        if tokens.dim() == 2:
            n = tokens.shape[1]
            side = int(round(n ** 0.5))
            if n == 0 or side * side != n:
                raise ValueError(
                    f"flat tokens [B, N] need a square grid (N = h*w with h == w), got N = {n}; pass [B, h, w] instead"
                )
            tokens = tokens.reshape(tokens.shape[0], side, side)
        elif tokens.dim() != 3:
            raise ValueError(f"tokens must have shape [B, h, w] or [B, h*w], got {tuple(tokens.shape)}")
        if tokens.numel() > 0:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"token indices must lie in [0, {self.codebook_size - 1}] (codebook size {self.codebook_size}), "
                    f"got values in [{lo}, {hi}]"
                )
        device, _ = self._device_dtype()
        return tokens.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ latents
    def encode_to_quant(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> (quantized latent ``[B, dim, H/f, W/f]``, indices ``[B, H/f, W/f]``).

        The quantized latent is the (l2-normalised) codebook entry of each index; no straight-through
        gradient is attached.
        """
        x = self._check_images(images)
        z = self.quant_conv(self.encoder(x))
        indices = self.quantize.nearest(z)
        return self.quantize.lookup(indices), indices

    def decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent ``[B, dim, h, w]`` -> images ``[B, 3, f*h, f*w]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(quant))

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> LongTensor ``[B, H/f, W/f]`` of codebook indices (raster).

        ``H`` and ``W`` must be multiples of :attr:`downsample_factor` (16 for five levels).
        Runs without gradients (indices have none).
        """
        return self.encode_to_quant(images)[1]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codebook indices ``[B, h, w]`` (or ``[B, h*w]`` for a square grid, raster) -> images ``[B, 3, f*h, f*w]``.

        The output is the decoder's raw output, nominally in [-1, 1] but **not clamped**: clamp
        (``x.clamp(-1, 1)``) before converting to pixels. Wrap in ``torch.no_grad()`` /
        ``torch.inference_mode()`` when no gradient is needed.
        """
        idx = self._check_tokens(tokens)
        return self.decode_quant(self.quantize.lookup(idx))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct: encode to the nearest codes and decode them (no straight-through gradient)."""
        quant, _ = self.encode_to_quant(images)
        return self.decode_quant(quant)


def build_vq(
    ch: int = 128,
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
    z_channels: int = 256,
    codebook_size: int = 16384,
    codebook_embed_dim: int = 8,
    codebook_l2_norm: bool = True,
    num_res_blocks: int = 2,
) -> VQModel:
    """Build a LlamaGen-style VQ tokenizer; the defaults are VQ-16 of ``vq_ds16_c2i.pt``.

    Weights are randomly initialised; see :func:`load_vq` for the released weights. Build under
    ``with torch.device('meta'):`` to inspect shapes without allocating memory.
    """
    return VQModel(
        ch=ch, ch_mult=ch_mult, z_channels=z_channels, codebook_size=codebook_size,
        codebook_embed_dim=codebook_embed_dim, codebook_l2_norm=codebook_l2_norm, num_res_blocks=num_res_blocks,
    )


def _read_state_dict(path: str | os.PathLike, map_location: Any) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` safely (``weights_only=True``), unwrapping ``{'model': ...}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VQ checkpoint {path!r} not found; download vq_ds16_c2i.pt from the Hugging Face repo "
            f"FoundationVision/LlamaGen (see tokenizers/README.md)"
        )
    try:
        from lpd.checkpoint import load_state_dict  # the project's shared safe loader, when present
    except ImportError:
        load_state_dict = None
    if load_state_dict is not None:
        return load_state_dict(path, map_location=map_location)
    # Training checkpoints may carry an argparse.Namespace under 'args'; allow that one class only.
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe_globals is not None:
        with safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"VQ checkpoint {path!r} holds a {type(ckpt).__name__}, not a state dict")
    return dict(ckpt)


def load_vq_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load ``state_dict`` into ``model``; on any difference raise a ``ValueError`` listing
    the missing keys, the unexpected keys and the shape mismatches."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise ValueError("VQ checkpoint does not match the model config; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_vq(path: str | os.PathLike, map_location: Any = "cpu", **config: Any) -> VQModel:
    """Build a VQ tokenizer with ``config`` (:func:`build_vq` keywords) and load ``path`` strictly.

    ``path`` holds ``{'model': state_dict, ...}`` (the released ``vq_ds16_c2i.pt``) or a bare
    state dict; it is read with ``weights_only=True``. The model is returned in eval mode on the
    device of ``map_location``.
    """
    state_dict = _read_state_dict(path, map_location)
    model = build_vq(**config)
    load_vq_state_dict(model, state_dict)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(torch.device(map_location))
    return model.eval()
