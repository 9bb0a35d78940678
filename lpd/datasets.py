"""Training data: ImageFolder with the ADM centre crop, and the two token-cache layouts.

Images
    :func:`center_crop_arr` is ADM's centre crop (halve with ``BOX`` while the short side is at
    least twice ``img_size``, resize with ``BICUBIC`` so the short side is ``img_size``, crop the
    centre); :func:`image_folder` wraps a torchvision ``ImageFolder`` with it and returns images in
    ``[-1, 1]``.  ``--data_path`` may be the ImageFolder itself or a folder holding ``train/``.

Token caches (written by ``main_cache.py``, read by ``main_train.py --use_cached``)
    Every image is stored twice: its tokens and the tokens of its horizontally flipped copy, both
    in raster order (``h*w`` ids of the VQ codebook).  Training takes the flipped variant with
    probability 0.5.

    * **released** layout (``--cache_format released``): one ``.npz`` per image,
      ``CACHED_PATH/<class folder>/<image file name>.npz`` with the int64 arrays ``indices`` and
      ``indices_flip``.  This project writes them with shape ``[h*w]``; the reader accepts any shape
      holding ``h*w`` values (e.g. ``[1, h*w]`` or ``[h, w]``).  Labels are the indices of the
      sorted class folders, as in ``ImageFolder``.
    * **consolidated** layout (``--cache_format consolidated``): ``CACHED_PATH/meta.json`` and, per
      shard ``s``, ``shard-SSSSS.tokens.npy`` (``[M, 2, h*w]``, int16 when the vocabulary fits,
      else int32; ``[:, 0]`` original, ``[:, 1]`` flipped), ``shard-SSSSS.labels.npy`` (``[M]``
      int64) and ``shard-SSSSS.index.npy`` (``[M]`` int64, the image's index in the ImageFolder).
      Shards are memory-mapped at training time; 1.28 M ImageNet images are a few dozen files.

    Both readers return ``(tokens [2, h*w] int64, label)`` items in ImageFolder order, so the two
    layouts of one ImageFolder give identical datasets.  A file that cannot be read, holds the
    wrong number of tokens for the resolution, or ids outside the vocabulary raises
    :class:`CacheError` naming the file.

Writing (:func:`write_token_cache`) is sharded over ranks and resumable: released files are
written atomically (temporary file, fsync, rename) and skipped when present; consolidated shards
are filled in ``*.partial`` files with a per-row "done" mask and renamed into place only once
complete.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from lpd.checkpoint import atomic_write_bytes

__all__ = [
    "CacheError",
    "center_crop_arr",
    "image_folder",
    "resolve_image_root",
    "ReleasedTokenCache",
    "ConsolidatedTokenCache",
    "open_token_cache",
    "detect_cache_format",
    "write_token_cache",
    "CacheStats",
    "released_cache_file",
    "token_dtype",
]

CACHE_FORMATS = ("released", "consolidated")
META_NAME = "meta.json"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CacheError(RuntimeError):
    """A token-cache file that cannot be read or does not fit the model."""


def _file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` would give a new file (read once, umask is process-wide)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE: list[int] = []


def _write_public(path: str, write_fn: Callable[[Any], None]) -> None:
    """Atomic write whose file gets the usual ``0o666 & ~umask`` mode (temporary files are 0600)."""
    if not _MODE:
        _MODE.append(_file_mode())
    mode = _MODE[0]

    def write(f: Any) -> None:
        write_fn(f)
        os.fchmod(f.fileno(), mode)

    atomic_write_bytes(path, write)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: ``uint8 [image_size, image_size, 3]`` from a PIL image of any size."""
    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


class _CenterCropToTensor:
    """ADM centre crop, then ``float32 [3, S, S]`` in ``[-1, 1]`` (picklable for DataLoader workers)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = center_crop_arr(img, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def resolve_image_root(data_path: str) -> str:
    """``data_path/train`` when it exists (the released ``--data_path IMAGENET`` convention), else ``data_path``."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path!r} is not a folder; give an ImageFolder (class sub-folders of images)")
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


def image_folder(data_path: str, img_size: int):
    """A torchvision ``ImageFolder`` of ``data_path`` (or ``data_path/train``) with the ADM centre crop.

    Items are ``(image float32 [3, img_size, img_size] in [-1, 1], label)``.
    """
    from torchvision.datasets import ImageFolder

    return ImageFolder(resolve_image_root(data_path), transform=_CenterCropToTensor(img_size))


# ---------------------------------------------------------------------------------------------
# Reading caches
# ---------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest signed integer type of the consolidated layout that holds ids ``< vocab_size``."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def _check_tokens(arr: np.ndarray, num_tokens: int, vocab_size: int | None, where: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise CacheError(f"{where}: tokens have dtype {arr.dtype}, expected integers (VQ code ids)")
    if arr.size != num_tokens:
        g = math.isqrt(num_tokens)
        raise CacheError(
            f"{where}: holds {arr.size} tokens per image, but the model's token grid has {num_tokens} "
            f"({g}x{g}); the cache was written at another resolution or with another tokenizer "
            f"(check --img_size and --cached_path)"
        )
    flat = arr.reshape(-1).astype(np.int64, copy=False)
    if vocab_size is not None and flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise CacheError(
            f"{where}: token ids range over [{int(flat.min())}, {int(flat.max())}], outside the "
            f"vocabulary [0, {vocab_size}); the cache was written with another tokenizer"
        )
    return flat


def released_cache_file(cached_path: str, class_name: str, image_file: str) -> str:
    """Path of one image's ``.npz`` in the released layout: ``<cached_path>/<class>/<file name>.npz``."""
    return os.path.join(cached_path, class_name, os.path.basename(image_file) + ".npz")


class ReleasedTokenCache(torch.utils.data.Dataset):
    """The released layout: one ``.npz`` (``indices``, ``indices_flip``) per image in class folders.

    Items: ``(tokens int64 [2, num_tokens], label)``; row 0 the image, row 1 its flipped copy.
    """

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        if not os.path.isdir(root):
            raise CacheError(f"cache folder {root!r} does not exist; write it with main_cache.py")
        self.root = root
        self.num_tokens = num_tokens
        self.vocab_size = vocab_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise CacheError(f"cache folder {root!r} has no class folders; write it with main_cache.py")
        self.files: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(self.classes):
            names = sorted(e.name for e in os.scandir(os.path.join(root, cls)) if e.name.endswith(".npz") and e.is_file())
            self.files.extend(os.path.join(root, cls, n) for n in names)
            labels.extend([label] * len(names))
        if not self.files:
            raise CacheError(f"cache folder {root!r} holds no .npz files; write it with main_cache.py")
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """Validated tokens ``int64 [2, num_tokens]`` of item ``index``."""
        path = self.files[index]
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("indices", "indices_flip") if k not in z.files]
                if missing:
                    raise CacheError(
                        f"cache file {path!r} has no {missing} array (it holds {z.files}); the released layout "
                        f"stores 'indices' and 'indices_flip'"
                    )
                a, b = z["indices"], z["indices_flip"]
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CacheError(
                f"cache file {path!r} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated: "
                f"delete it and rerun main_cache.py, which rewrites missing files only"
            ) from e
        where = f"cache file {path!r}"
        return np.stack([_check_tokens(a, self.num_tokens, self.vocab_size, where),
                         _check_tokens(b, self.num_tokens, self.vocab_size, where)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.load(index)), int(self.labels[index])


def _shard_names(root: str, shard: int) -> dict[str, str]:
    base = os.path.join(root, f"shard-{shard:05d}")
    return {k: f"{base}.{k}.npy" for k in ("tokens", "labels", "index")}


def _read_meta(root: str) -> dict[str, Any]:
    path = os.path.join(root, META_NAME)
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"cache metadata {path!r} cannot be read ({e}); rerun main_cache.py") from e
    if meta.get("format") != "consolidated":
        raise CacheError(f"cache metadata {path!r} does not describe a consolidated cache")
    return meta


class ConsolidatedTokenCache(torch.utils.data.Dataset):
    """The consolidated layout: per shard one memory-mapped ``[M, 2, N]`` token array, labels and indices.

    Items are in ImageFolder order (sorted by the stored image index), as :class:`ReleasedTokenCache`.
    Memory maps are opened lazily in each process (DataLoader workers included).
    """

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        self.root = root
        self.num_tokens = num_tokens
        self.vocab_size = vocab_size
        meta = _read_meta(root)
        self.meta = meta
        self.classes = list(meta.get("classes", []))
        meta_path = os.path.join(root, META_NAME)
        if int(meta["num_tokens"]) != num_tokens:
            g = math.isqrt(num_tokens)
            raise CacheError(
                f"cache {meta_path!r} holds {meta['num_tokens']} tokens per image (img_size {meta.get('img_size')}), "
                f"but the model's token grid has {num_tokens} ({g}x{g}); check --img_size and --cached_path"
            )
        if vocab_size is not None and int(meta.get("vocab_size", 0)) > vocab_size:
            raise CacheError(
                f"cache {meta_path!r} was written with a {meta['vocab_size']}-code tokenizer, larger than the "
                f"model's vocabulary ({vocab_size})"
            )
        self.paths: list[dict[str, str]] = []
        shard_of, row_of, order = [], [], []
        for s in range(int(meta["num_shards"])):
            names = _shard_names(root, s)
            for k, p in names.items():
                if not os.path.isfile(p):
                    state = "unfinished" if os.path.exists(p + ".partial") else "missing"
                    raise CacheError(
                        f"cache shard file {p!r} is {state}; rerun main_cache.py with the same --cached_path "
                        f"to finish the cache"
                    )
            try:
                toks = np.load(names["tokens"], mmap_mode="r")
                labels = np.load(names["labels"])
                index = np.load(names["index"])
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"cache shard {names['tokens']!r} cannot be read ({e}); delete the shard and rerun main_cache.py") from e
            if toks.ndim != 3 or toks.shape[1] != 2 or toks.shape[2] != num_tokens:
                raise CacheError(
                    f"cache shard file {names['tokens']!r} has shape {list(toks.shape)}, expected "
                    f"[M, 2, {num_tokens}] for this token grid"
                )
            if not (labels.shape == index.shape == (toks.shape[0],)):
                raise CacheError(
                    f"cache shard {names['tokens']!r}: {toks.shape[0]} token rows but labels {list(labels.shape)} "
                    f"and index {list(index.shape)}; the shard is damaged, delete it and rerun main_cache.py"
                )
            self.paths.append(names)
            shard_of.append(np.full(toks.shape[0], s, dtype=np.int64))
            row_of.append(np.arange(toks.shape[0], dtype=np.int64))
            order.append(index.astype(np.int64))
        if not self.paths:
            raise CacheError(f"cache {meta_path!r} lists no shards")
        shard_all, row_all, index_all = map(np.concatenate, (shard_of, row_of, order))
        perm = np.argsort(index_all, kind="stable")
        self.shard = shard_all[perm]
        self.row = row_all[perm]
        self.labels = np.concatenate([np.load(p["labels"]) for p in self.paths]).astype(np.int64)[perm]
        self._mm: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mm"] = None  # never pickle memory maps into workers
        return state

    def __len__(self) -> int:
        return len(self.shard)

    def load(self, index: int) -> np.ndarray:
        """Validated tokens ``int64 [2, num_tokens]`` of item ``index``."""
        if self._mm is None:
            self._mm = [np.load(p["tokens"], mmap_mode="r") for p in self.paths]
        s, r = int(self.shard[index]), int(self.row[index])
        arr = np.asarray(self._mm[s][r])
        where = f"cache shard file {self.paths[s]['tokens']!r} (row {r})"
        return _check_tokens(arr, 2 * self.num_tokens, self.vocab_size, where).reshape(2, self.num_tokens)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.load(index)), int(self.labels[index])


def detect_cache_format(root: str) -> str:
    """``'consolidated'`` when ``root/meta.json`` exists, else ``'released'``."""
    return "consolidated" if os.path.isfile(os.path.join(root, META_NAME)) else "released"


def open_token_cache(root: str, num_tokens: int, vocab_size: int | None = None, cache_format: str = "auto"):
    """Open a token cache of either layout (``cache_format`` ``auto`` detects it)."""
    if not os.path.isdir(root):
        raise CacheError(f"--cached_path {root!r} does not exist; write the cache with main_cache.py")
    fmt = detect_cache_format(root) if cache_format in (None, "", "auto") else cache_format
    if fmt == "released":
        return ReleasedTokenCache(root, num_tokens, vocab_size)
    if fmt == "consolidated":
        return ConsolidatedTokenCache(root, num_tokens, vocab_size)
    raise ValueError(f"unknown cache format {cache_format!r}; use auto, released or consolidated")


# ---------------------------------------------------------------------------------------------
# Writing caches
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What one rank did: images encoded now, and images found already done."""

    written: int = 0
    skipped: int = 0


def _shard_plan(num_images: int, world_size: int, shard_size: int | None) -> tuple[int, int]:
    """``(num_shards, shard_size)``: by default a multiple of the world size, at most 2**18 images each."""
    if shard_size is None or shard_size <= 0:
        per = world_size * max(1, math.ceil(num_images / (world_size * 262144)))
        shard_size = max(1, math.ceil(num_images / per))
    return max(1, math.ceil(num_images / shard_size)), shard_size


def _write_meta_or_check(root: str, meta: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(root, META_NAME)
    if os.path.isfile(path):
        old = _read_meta(root)
        for k in ("img_size", "num_tokens", "num_images", "classes", "dtype"):
            if old.get(k) != meta.get(k):
                raise CacheError(
                    f"{path!r} describes another cache ({k}: {old.get(k)!r} there, {meta.get(k)!r} now); "
                    f"use a fresh --cached_path"
                )
        return old  # keeps the shard plan of the first run, whatever the world size now
    _write_public(path, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    return meta


class _ConsolidatedWriter:
    """Fills this rank's shards row by row; a shard is renamed into place once every row is done."""

    def __init__(self, root: str, meta: dict[str, Any], shards: Sequence[int], labels: np.ndarray) -> None:
        self.root, self.meta = root, meta
        self.size = int(meta["shard_size"])
        self.n = int(meta["num_images"])
        self.open: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.pending: dict[int, np.ndarray] = {}
        dtype = np.dtype(meta["dtype"])
        for s in shards:
            names = _shard_names(root, s)
            if all(os.path.isfile(p) for p in names.values()):
                continue
            lo, hi = s * self.size, min(self.n, (s + 1) * self.size)
            shape = (hi - lo, 2, int(meta["num_tokens"]))
            tok_p, done_p = names["tokens"] + ".partial", os.path.join(root, f"shard-{s:05d}.done.npy.partial")
            if os.path.isfile(tok_p) and os.path.isfile(done_p):
                toks = np.lib.format.open_memmap(tok_p, mode="r+")
                done = np.lib.format.open_memmap(done_p, mode="r+")
                if toks.shape != shape or toks.dtype != dtype or done.shape != (shape[0],):
                    raise CacheError(f"unfinished shard {tok_p!r} does not fit this cache; delete it and rerun")
            else:
                toks = np.lib.format.open_memmap(tok_p, mode="w+", dtype=dtype, shape=shape)
                done = np.lib.format.open_memmap(done_p, mode="w+", dtype=np.uint8, shape=(shape[0],))
            for key, arr in (("labels", labels[lo:hi].astype(np.int64)), ("index", np.arange(lo, hi, dtype=np.int64))):
                _write_public(names[key] + ".partial", lambda f, a=arr: np.save(f, a))
            self.open[s] = (toks, done)
            self.pending[s] = np.flatnonzero(done[:] == 0) + lo

    def todo(self) -> list[int]:
        return sorted(int(i) for p in self.pending.values() for i in p)

    def write(self, index: int, tokens: np.ndarray) -> None:
        s = index // self.size
        toks, _ = self.open[s]
        toks[index - s * self.size] = tokens

    def commit(self, indices: Sequence[int]) -> None:
        """Flush the rows of ``indices``, then mark them done; finish shards that are complete."""
        touched = sorted({i // self.size for i in indices})
        for s in touched:
            self.open[s][0].flush()
        for i in indices:
            s = i // self.size
            self.open[s][1][i - s * self.size] = 1
        for s in touched:
            toks, done = self.open[s]
            done.flush()
            if bool(done.all()):
                self._finish(s)

    def finish_complete(self) -> None:
        for s in list(self.open):
            if bool(self.open[s][1].all()):
                self._finish(s)

    def _finish(self, s: int) -> None:
        toks, done = self.open.pop(s)
        toks.flush()
        with open(toks.filename, "rb+") as f:
            os.fsync(f.fileno())
        del toks, done
        names = _shard_names(self.root, s)
        for key in ("labels", "index", "tokens"):  # tokens last: its presence marks the shard complete
            os.replace(names[key] + ".partial", names[key])
        os.unlink(os.path.join(self.root, f"shard-{s:05d}.done.npy.partial"))


def write_token_cache(
    dataset,
    cached_path: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache_format: str,
    *,
    img_size: int,
    num_tokens: int,
    vocab_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
    shard_size: int | None = None,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> CacheStats:
    """Encode ``dataset`` (an ``ImageFolder`` with the ADM crop) into ``cached_path``; this rank's share only.

    ``encode(images [B, 3, S, S] in [-1, 1]) -> [B, h, w]`` token ids, ``h * w == num_tokens``.  Each image is encoded as is
    and flipped horizontally.  Images already cached are skipped, so an interrupted run is resumed
    by running it again (with any number of ranks).  ``barrier`` synchronises ranks (rank 0 writes
    the consolidated ``meta.json`` first).
    """
    if cache_format not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format {cache_format!r}; use one of {CACHE_FORMATS}")
    os.makedirs(cached_path, exist_ok=True)
    existing = detect_cache_format(cached_path)
    if existing != cache_format and (existing == "consolidated" or any(e.is_dir() for e in os.scandir(cached_path))):
        raise CacheError(f"{cached_path!r} already holds a {existing} cache; use another --cached_path for the {cache_format} layout")
    samples: list[tuple[str, int]] = list(dataset.samples)
    classes: list[str] = list(dataset.classes)
    n = len(samples)
    if n == 0:
        raise CacheError("the ImageFolder holds no images")
    stats = CacheStats()
    writer: _ConsolidatedWriter | None = None
    if cache_format == "released":
        mine = list(range(rank, n, world_size))
        targets = {i: released_cache_file(cached_path, classes[samples[i][1]], samples[i][0]) for i in mine}
        todo = [i for i in mine if not os.path.isfile(targets[i])]
        for cls in classes:
            os.makedirs(os.path.join(cached_path, cls), exist_ok=True)
    else:
        num_shards, size = _shard_plan(n, world_size, shard_size)
        meta = dict(format="consolidated", img_size=img_size, num_tokens=num_tokens, vocab_size=vocab_size,
                    num_images=n, num_shards=num_shards, shard_size=size, classes=classes,
                    dtype=token_dtype(vocab_size).name, layout="tokens [M, 2, N]: [:, 0] image, [:, 1] flipped")
        if rank == 0:
            _write_meta_or_check(cached_path, meta)
        barrier()
        meta = _read_meta(cached_path)
        labels = np.asarray([t for _, t in samples], dtype=np.int64)
        shards = list(range(rank, int(meta["num_shards"]), world_size))
        writer = _ConsolidatedWriter(cached_path, meta, shards, labels)
        mine = [i for s in shards for i in range(s * int(meta["shard_size"]), min(n, (s + 1) * int(meta["shard_size"])))]
        todo = writer.todo()
    stats.skipped = len(mine) - len(todo)
    if todo:
        subset = torch.utils.data.Subset(dataset, todo)
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             pin_memory=torch.device(device).type == "cuda")
        it: Iterator = iter(loader)
        if progress and rank == 0:
            from tqdm import tqdm

            it = tqdm(it, total=len(loader), desc=f"caching ({cache_format}, rank 0 of {world_size})")
        pos = 0
        for images, _ in it:
            images = images.to(device, non_blocking=True)
            with torch.no_grad():
                toks = encode(torch.cat([images, images.flip(-1)]))
            if toks[0].numel() != num_tokens:
                raise CacheError(f"the tokenizer gives {toks[0].numel()} tokens per image, expected {num_tokens}")
            toks = toks.reshape(2, images.shape[0], -1).transpose(0, 1).cpu().numpy().astype(np.int64)  # [B, 2, N]
            idx = todo[pos : pos + images.shape[0]]
            pos += images.shape[0]
            for j, i in enumerate(idx):
                if writer is None:
                    a, b = toks[j, 0], toks[j, 1]
                    _write_public(targets[i], lambda f, a=a, b=b: np.savez(f, indices=a, indices_flip=b))
                else:
                    writer.write(i, toks[j])
            if writer is not None:
                writer.commit(idx)
            stats.written += len(idx)
    if writer is not None:
        writer.finish_complete()
    barrier()
    return stats

