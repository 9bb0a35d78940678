"""Image tokenizers: the LlamaGen VQ-16 (``vq_ds16_c2i.pt``) that maps images to LPD's tokens and back.

``vq.encode(images [B, 3, H, W] in [-1, 1]) -> [B, H/16, W/16]``, ``vq.decode(tokens) -> images``.
:func:`make_tokenizer` is what the entry points call.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lpd.tokenizer.vq import VQModel, VectorQuantizer, build_vq, load_vq, load_vq_state_dict

__all__ = ["VQModel", "VectorQuantizer", "build_vq", "load_vq", "load_vq_state_dict", "make_tokenizer"]


def make_tokenizer(kind: str = "vq", vqgan_path: str | os.PathLike | None = None, vq_config: dict[str, Any] | None = None,
                   seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The tokenizer an entry point asks for, in eval mode on ``device``.

    ``vq``: the file ``vqgan_path`` (``vq_config`` overrides its architecture); without a path but
    with a ``vq_config`` (``{}``: the released architecture), random weights from ``seed`` for smoke
    tests; with neither, the released ``vq_ds16_c2i.pt`` from the Hugging Face cache (rank 0 first).
    ``palette``: the CPU demo's exact palette tokenizer (``vq_config`` are its arguments).
    """
    if kind == "palette":
        from lpd.demo.palette import PaletteTokenizer

        return PaletteTokenizer(**(vq_config or {})).to(device).eval()
    if kind != "vq":
        raise ValueError(f"--tokenizer: unknown tokenizer {kind!r}; use 'vq' or 'palette'")
    if vqgan_path is None and vq_config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vq = build_vq(**vq_config)
        return vq.to(device).eval()
    if vqgan_path is None:
        from lpd import hub
        from lpd.distributed import rank0_first

        vqgan_path = rank0_first(hub.resolve_vq)
    return load_vq(vqgan_path, **(vq_config or {})).to(device).eval()
