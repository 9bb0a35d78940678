"""Image tokenizers: the LlamaGen VQ-16 model that maps images to LPD's discrete tokens and back.

``build_vq(**config)`` builds it (defaults: the released ``vq_ds16_c2i.pt``), ``load_vq(path)``
loads that file strictly; ``vq.encode(images) -> [B, H/16, W/16]`` indices and
``vq.decode(tokens) -> [B, 3, 16h, 16w]`` images (unclamped, nominally in [-1, 1]).
:func:`make_tokenizer` is what the entry points call: a checkpoint file, a randomly initialised
VQ for smoke tests, or the exact palette tokenizer of the CPU demo (``tokenizer: palette``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lpd.tokenizer.vq import VQModel, VectorQuantizer, build_vq, load_vq, load_vq_state_dict

__all__ = ["VQModel", "VectorQuantizer", "build_vq", "load_vq", "load_vq_state_dict", "make_tokenizer"]


def make_tokenizer(
    kind: str = "vq",
    vqgan_path: str | os.PathLike | None = None,
    vq_config: dict[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The tokenizer an entry point asks for, in eval mode on ``device``.

    * ``kind="palette"``: :class:`lpd.tokenizer.palette.PaletteTokenizer` (``vq_config`` are its kwargs).
    * ``kind="vq"`` with ``vqgan_path``: the checkpoint, loaded strictly (``vq_config`` overrides the
      architecture, e.g. a narrow test VQ).
    * ``kind="vq"`` without a path but with ``vq_config``: a VQ whose weights depend only on ``seed``
      (identical on every rank) -- for smoke tests and speed measurements, not for real images.
    """
    if kind == "palette":
        from lpd.tokenizer.palette import PaletteTokenizer

        return PaletteTokenizer(**(vq_config or {})).to(device).eval()
    if kind != "vq":
        raise ValueError(f"unknown tokenizer {kind!r}; use 'vq' or 'palette'")
    if vqgan_path is not None:
        return load_vq(vqgan_path, **(vq_config or {})).to(device).eval()
    if vq_config is None:
        raise ValueError(
            "no tokenizer: pass --vqgan_path (vq_ds16_c2i.pt), or a vq_config for a randomly initialised test VQ"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = build_vq(**vq_config)
    return vq.to(device).eval()
