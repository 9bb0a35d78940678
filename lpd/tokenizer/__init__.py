"""Image tokenizers: the LlamaGen VQ-16 and the demo's palette; :func:`make_tokenizer` picks one."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from lpd import hub
from lpd.distributed import rank0_first
from lpd.tokenizer.palette import PaletteTokenizer
from lpd.tokenizer.vq import VQModel, build_vq, load_vq

__all__ = ["VQModel", "PaletteTokenizer", "build_vq", "load_vq", "make_tokenizer"]


def make_tokenizer(
    kind: str = "vq",
    vqgan_path: str | os.PathLike | None = None,
    vq_config: dict[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """The tokenizer ``kind`` (``vq`` or the demo's ``palette``) built with ``vq_config``, in eval
    mode on ``device``. ``vq`` without ``vqgan_path``: random weights from ``seed`` if ``vq_config``
    is given (``{}``: VQ-16), else the released ``vq_ds16_c2i.pt`` (rank 0 downloads it first);
    ``vqgan_path`` may name a released file (``vq_ds16_t2i.pt``) that is no local file."""
    if kind not in ("vq", "palette"):
        raise ValueError(f"--tokenizer: unknown tokenizer {kind!r}; use 'vq' or 'palette'")
    known = set(inspect.signature(PaletteTokenizer if kind == "palette" else build_vq).parameters)
    if unknown := sorted(set(vq_config or {}) - known):
        raise ValueError(
            f"--vq_config: unknown keys {unknown} for the {kind} tokenizer; use {sorted(known)}"
        )
    if kind == "palette":
        return PaletteTokenizer(**(vq_config or {})).to(device).eval()
    if vqgan_path is None and vq_config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_vq(**vq_config).to(device).eval()
    if vqgan_path is None or (
        os.fspath(vqgan_path) in hub.VQ_FILENAMES and not os.path.exists(vqgan_path)
    ):  # the released file, or one named
        vqgan_path = rank0_first(lambda: hub.resolve_vq(vqgan_path))
    return load_vq(vqgan_path, **(vq_config or {})).to(device).eval()


def tokenizer_ref(args: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer of training ``args``: the released LlamaGen VQ, a file, or a seeded build."""
    kind = args.get("tokenizer", "vq")
    if args.get("vqgan_path"):
        return {"kind": kind, "file": os.path.basename(str(args["vqgan_path"]))}
    if args.get("vq_config") is not None or kind != "vq":
        return {"kind": kind, "vq_config": args.get("vq_config"), "seed": args.get("seed", 0)}
    return {"kind": "vq", "repo": hub.VQ_REPO, "file": hub.VQ_FILENAME}


def recorded_tokenizer(
    ref: Mapping[str, Any],
    vqgan_path: str | os.PathLike | None,
    device: torch.device | str,
    where: str,
) -> torch.nn.Module:
    """The tokenizer a :func:`tokenizer_ref` of ``where`` names; ``vqgan_path``: the VQ file."""
    kind, file, config = ref.get("kind", "vq"), ref.get("file"), ref.get("vq_config")
    named = file not in (None, hub.VQ_FILENAME)
    if vqgan_path is None and kind == "vq" and config is None and named:
        if file not in hub.VQ_FILENAMES:
            raise ValueError(
                f"{where} was trained with the tokenizer file {file}; pass its path with --vqgan_path"
            )
        vqgan_path = file  # the released file of that name, from the Hub cache
    config = config if vqgan_path is None else None
    return make_tokenizer(kind, vqgan_path, config, ref.get("seed", 0), device)
