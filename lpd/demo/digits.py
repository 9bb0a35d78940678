"""Embedded handwritten digits as LPD token grids, for the CPU demo (no download, no scikit-learn).

Data: ``lpd/data/digits.npz`` holds ``images`` (uint8 ``[1797, 8, 8]``, values 0..16) and
``labels`` (int64 ``[1797]``, the digit 0..9). It is the "Optical Recognition of Handwritten
Digits" test set of the UCI Machine Learning Repository (E. Alpaydin and C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80, licensed CC BY 4.0), copied unchanged, in the same order,
from the ``digits.csv.gz`` that scikit-learn (BSD-3-Clause) bundles as
``sklearn.datasets.load_digits``. Each 8x8 value counts the "on" pixels of a 4x4 block of a 32x32
bitmap.

Pipeline: the 8x8 counts are scaled to ``[0, 1]``, upsampled bicubically to a
``grid_size x grid_size`` grid (16 by default: exactly the 256 px token grid, so the released
256 px group-size tables and locality-aware orders apply unchanged), clipped, and quantised to the
nearest of ``levels`` grey intensities by :class:`~lpd.demo.palette.PaletteTokenizer` (token
0 = black background, ``levels - 1`` = white ink). Bicubic upsampling gives smoother strokes than
nearest (which keeps the blocky 8x8 look) and crisper ones than bilinear; 4 levels keep some
anti-aliasing with a four-token vocabulary (2 levels thicken strokes, 8 barely look better).

Split: the held-out (``"test"``) split is every fifth example of each class in file order (the
5th, 10th, ... example of each digit): 355 images, stratified, about 20%, with no random numbers
involved so it can never drift between library versions. ``"train"`` is the other 1,442 and
``"all"`` all 1,797, always in file order.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from torch import Tensor
import torch.nn.functional as F
from torch.utils.data import Dataset

from lpd.demo.palette import DEFAULT_LEVELS, PaletteTokenizer, images_to_uint8

__all__ = [
    "DEFAULT_GRID_SIZE",
    "DEFAULT_LEVELS",
    "HELD_OUT_EVERY",
    "NUM_CLASSES",
    "SPLITS",
    "DigitTokens",
    "digit_intensities",
    "load_digits_dataset",
    "load_digits_images",
    "load_raw_digits",
    "split_indices",
]

NUM_CLASSES = 10
#: Token grid side: 16 = the 256 px grid of the released models.
DEFAULT_GRID_SIZE = 16
#: Every ``HELD_OUT_EVERY``-th example of each class (in file order) is held out.
HELD_OUT_EVERY = 5
SPLITS = ("train", "test", "all")

_NUM_DIGITS = 1797
_RAW_MAX = 16  # 8x8 values count on-pixels of 4x4 blocks: 0..16


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("lpd").joinpath("data", "digits.npz")
    with resources.as_file(path) as file, np.load(file, allow_pickle=False) as data:
        images = np.ascontiguousarray(data["images"], dtype=np.uint8)
        labels = np.ascontiguousarray(data["labels"], dtype=np.int64)
    if images.shape != (_NUM_DIGITS, 8, 8) or labels.shape != (_NUM_DIGITS,):
        raise RuntimeError(
            f"corrupt {path}: images {images.shape}, labels {labels.shape}; "
            f"expected ({_NUM_DIGITS}, 8, 8) and ({_NUM_DIGITS},)"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded data as stored: uint8 images ``[1797, 8, 8]`` (0..16), int64 labels ``[1797]``.

    The arrays are read-only (cached); copy them before modifying.
    """
    return _raw()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_indices(split: str = "train") -> np.ndarray:
    """Indices (into the embedded data, ascending) of ``"train"``, ``"test"`` or ``"all"``."""
    _check_split(split)
    _, labels = _raw()
    if split == "all":
        return np.arange(len(labels))
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        held_out[members[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]] = True
    return np.flatnonzero(held_out if split == "test" else ~held_out)


def _check_grid(grid_size: int) -> None:
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
        raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")


def digit_intensities(split: str = "train", grid_size: int = DEFAULT_GRID_SIZE) -> Tensor:
    """Unquantised ink intensities: float32 ``[M, grid_size, grid_size]`` in ``[0, 1]``.

    The 8x8 counts divided by 16, resized bicubically (antialiased when shrinking), clipped.
    """
    _check_grid(grid_size)
    images, _ = _raw()
    x = torch.from_numpy(images[split_indices(split)]).float().div_(_RAW_MAX).unsqueeze(1)
    if grid_size != 8:
        x = F.interpolate(
            x, size=(grid_size, grid_size), mode="bicubic", align_corners=False,
            antialias=grid_size < 8,
        )
    return x[:, 0].clamp_(0.0, 1.0)


def load_digits_dataset(
    split: str = "train", grid_size: int = DEFAULT_GRID_SIZE, levels: int = DEFAULT_LEVELS
) -> tuple[Tensor, Tensor]:
    """Digits as palette token grids.

    Args:
        split: ``"train"`` (1,442), ``"test"`` (355, held out for evaluation) or ``"all"``.
        grid_size: token grid side (16 = 256 px).
        levels: grey levels = vocabulary size of the tokens.

    Returns:
        ``(tokens, labels)``: LongTensor ``[M, grid_size, grid_size]`` with values in
        ``[0, levels)`` (0 = background), and LongTensor ``[M]`` with the digit ``0..9``.
        Flatten with ``tokens.flatten(1)`` for raster order ``[M, N]``.
    """
    tokenizer = PaletteTokenizer(levels, patch=1)  # one pixel per token: quantise each cell
    grey = digit_intensities(split, grid_size).mul_(2.0).sub_(1.0)  # [-1, 1]
    tokens = tokenizer.encode(grey.unsqueeze(1).expand(-1, 3, -1, -1))
    _, labels = _raw()
    return tokens, torch.from_numpy(labels[split_indices(split)].copy())


@torch.no_grad()
def load_digits_images(
    split: str = "test",
    grid_size: int = DEFAULT_GRID_SIZE,
    levels: int = DEFAULT_LEVELS,
    *,
    uint8: bool = True,
    patch: int = 16,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Digits in pixel space, decoded by ``PaletteTokenizer(levels, patch)``.

    Returns ``(images, labels)``: images uint8 ``[M, 3, patch * grid_size, patch * grid_size]``
    (``uint8=True``; the layout the metric code and ``.npz`` writers take) or float32 in
    ``[-1, 1]``; labels LongTensor ``[M]``. At 256 px this is 196 KiB per image in uint8
    (70 MB for the 355 test digits, four times that as float).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    tokens, labels = load_digits_dataset(split, grid_size, levels)
    tokenizer = PaletteTokenizer(levels, patch)
    side = patch * grid_size
    out = torch.empty(
        (len(tokens), 3, side, side), dtype=torch.uint8 if uint8 else torch.float32
    )
    for start in range(0, len(tokens), batch_size):
        chunk = tokenizer.decode(tokens[start : start + batch_size])
        out[start : start + len(chunk)] = images_to_uint8(chunk) if uint8 else chunk
    return out, labels


class DigitTokens(Dataset):
    """A map-style dataset of ``(tokens LongTensor [N] in raster order, label LongTensor [])``.

    ``N = grid_size ** 2`` (256 by default). ``tokens`` ``[M, N]`` and ``labels`` ``[M]`` are also
    exposed whole for code that batches by slicing.
    """

    def __init__(
        self, split: str = "train", grid_size: int = DEFAULT_GRID_SIZE, levels: int = DEFAULT_LEVELS
    ) -> None:
        grids, labels = load_digits_dataset(split, grid_size, levels)
        self.split = split
        self.grid_size = grid_size
        self.levels = levels
        self.num_classes = NUM_CLASSES
        self.tokens = grids.flatten(1)
        self.labels = labels

    @property
    def seq_len(self) -> int:
        """Tokens per image."""
        return self.grid_size * self.grid_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.tokens[index], self.labels[index]
