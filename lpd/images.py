"""Image files: PNGs, the ADM ``.npz`` of a run, sample grids, decoder output to uint8.

Every write is atomic (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from lpd.checkpoint import atomic_write_bytes

__all__ = ["image_path", "write_png", "read_png", "write_npz", "save_grid", "to_uint8", "ImageFileError"]


class ImageFileError(ValueError):
    """An image file that is missing or cannot be decoded."""


def image_path(image_dir: str | os.PathLike, index: int) -> str:
    """``image_dir/000123.png``."""
    return os.path.join(os.fspath(image_dir), f"{int(index):06d}.png")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` image as PNG (no fsync: a damaged file fails the next run's check)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()), fsync=False)


def read_png(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """The uint8 ``[H, W, 3]`` pixels of an RGB PNG of ``size`` (height, width), or None if it is
    missing, unreadable or of another kind."""
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "PNG" or im.mode != "RGB":
                return None
            arr = np.asarray(im)  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, SyntaxError):
        return None
    return arr if size is None or tuple(arr.shape[:2]) == tuple(size) else None


def write_npz(path: str | os.PathLike, image_paths: Sequence[str], size: tuple[int, int]) -> None:
    """Pack PNGs into an ADM ``.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``), streamed one image at a time."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(image_paths), int(size[0]), int(size[1]), 3)}

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for p in image_paths:
                    arr = read_png(p, size)
                    if arr is None:
                        raise ImageFileError(f"cannot pack {p!r} into {os.fspath(path)!r}: missing or unreadable PNG")
                    out.write(arr.tobytes())

    atomic_write_bytes(path, write)


def save_grid(path: str | os.PathLike, images: Sequence[np.ndarray], ncol: int = 8, max_tile: int = 256) -> None:
    """Write uint8 ``[H, W, 3]`` images as one PNG grid (tiles shrunk to at most ``max_tile`` pixels)."""
    if len(images) == 0:
        raise ValueError("save_grid needs at least one image")
    h, w = images[0].shape[:2]
    scale = min(1.0, max_tile / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    ncol = min(ncol, len(images))
    canvas = Image.new("RGB", (ncol * tw, math.ceil(len(images) / ncol) * th), (255, 255, 255))
    for k, arr in enumerate(images):
        tile = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        canvas.paste(tile if (th, tw) == (h, w) else tile.resize((tw, th), Image.BICUBIC), ((k % ncol) * tw, (k // ncol) * th))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]``, as the released sampling code."""
    x = ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
