"""Embedded handwritten digits as palette token grids: ``lpd/data/digits.npz`` is the UCI "Optical Recognition of
Handwritten Digits" test set (E. Alpaydin and C. Kaynak, 1998; CC BY 4.0) as scikit-learn bundles it, upsampled
bicubically to the token grid; every fifth example of each digit is held out (355), the other 1,442 train.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lpd.tokenizer.palette import DEFAULT_LEVELS, PaletteTokenizer

NUM_CLASSES = 10
GRID_SIZE = 16


@lru_cache(maxsize=1)
def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded data as stored (read-only): uint8 images ``[1797, 8, 8]``, int64 labels ``[1797]``."""
    path = resources.files("lpd").joinpath("data", "digits.npz")
    with resources.as_file(path) as file, np.load(file, allow_pickle=False) as data:
        images, labels = np.array(data["images"], np.uint8), np.array(data["labels"], np.int64)
    if images.shape != (1797, 8, 8) or labels.shape != (1797,):
        raise RuntimeError(
            f"corrupt {path}: images {images.shape}, labels {labels.shape}; reinstall lpd"
        )
    for array in (images, labels):
        array.setflags(write=False)
    return images, labels


def split_indices(split: str = "train") -> np.ndarray:
    """Ascending indices of ``"train"`` (1,442), ``"test"`` (355) or ``"all"`` (1,797)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    _, labels = load_raw_digits()
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        held_out[np.flatnonzero(labels == digit)[4::5]] = True
    chosen = {"train": ~held_out, "test": held_out, "all": np.ones_like(held_out)}[split]
    return np.flatnonzero(chosen)


def load_digits_dataset(
    split: str = "train", grid_size: int = GRID_SIZE, levels: int = DEFAULT_LEVELS
) -> tuple[Tensor, Tensor]:
    """``(tokens int64 [M, grid_size, grid_size] in [0, levels), labels int64 [M])`` of a split."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")
    images, labels = load_raw_digits()
    idx = split_indices(split)
    x = torch.from_numpy(images[idx]).float().div_(16.0).unsqueeze(1)
    size = (grid_size, grid_size)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=grid_size < 8).clamp_(0.0, 1.0)
    tokens = PaletteTokenizer(levels, patch=1).encode(x.mul_(2.0).sub_(1.0).expand(-1, 3, -1, -1))
    return tokens, torch.from_numpy(labels[idx].copy())
