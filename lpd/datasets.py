"""Training data: ImageFolder with the ADM centre crop, and the token caches of ``main_cache.py``.

Layouts and records: docs/design.md. Both layouts read as ``(tokens int64 [2, h*w], label)`` in ImageFolder
order; consolidated shards hold int16 tokens (int32 for vocabularies over 32768).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lpd.files import TMP_PREFIX, atomic_write_bytes, state_dict_digest
from lpd.images import IMAGE_EXTENSIONS, center_crop_arr, image_to_tensor, read_image

__all__ = [
    "CacheError",
    "DataError",
    "center_crop_arr",
    "ImageFolder",
    "image_folder",
    "class_folders",
    "resolve_image_root",
    "ReleasedTokenCache",
    "ConsolidatedTokenCache",
    "open_token_cache",
    "read_record",
    "tokenizer_id",
    "write_token_cache",
    "CacheStats",
    "token_dtype",
]

CACHE_FORMATS = ("released", "consolidated")
META_NAME = "meta.json"
CROP = "adm_center_crop"  # the crop rule of center_crop_arr, recorded in every cache
_IDENTITY = (
    "format",
    "tokenizer",
    "img_size",
    "crop",
    "num_tokens",
    "vocab_size",
    "num_images",
    "classes",
    "images",
)
_SHARD_KEYS = ("num_shards", "shard_size", "dtype")


class DataError(RuntimeError):
    """A training file that cannot be read. Raised in a DataLoader worker, it keeps its one-line
    message (torch re-raises it as ``type(e)("Caught ...<traceback>...Class: message")``)."""

    def __init__(self, message: str = "") -> None:
        head = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and head in message:
            message = message.rsplit(head, 1)[1].strip()
        super().__init__(message)


class CacheError(DataError):
    """A token cache that cannot be read, is incomplete, or does not fit the model or the run."""


def _start_over(root: str) -> str:
    return f"use another --cached_path, or delete {root!r} to start over"


def _crop_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    return image_to_tensor(center_crop_arr(img, image_size))[0]


def resolve_image_root(data_path: str) -> str:
    """``data_path/train`` when it exists (the released ``--data_path IMAGENET``), else ``data_path``."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(
            f"--data_path {data_path!r} is not a folder; give an ImageFolder (class sub-folders of images)"
        )
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


def _visible(name: str) -> bool:
    return not name.startswith(
        "."
    )  # .ipynb_checkpoints, .DS_Store, ._x.jpg: never classes or images


def _walk_once(top: str, seen: set[str]) -> list[tuple[str, list[str]]]:
    """``(folder, sorted visible files)`` under ``top`` in sorted order, each real folder once (links followed
    once: no loops, no images counted twice)."""
    found = []
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        dirs[:] = [] if real in seen else sorted(filter(_visible, dirs))
        if real not in seen:
            seen.add(real)
            found.append((root, sorted(filter(_visible, files))))
    return sorted(found)


def class_folders(root: str) -> list[str]:
    """The class folders of ``root``, sorted; hidden folders are not classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder (``root``, ``classes``, ``samples``, ``loader``; sorted classes and files) with
    the ADM crop: ``(float32 [3, S, S] in [-1, 1], label)``. Hidden folders and files are skipped, a linked
    folder is read once (no loops), images are read by their mode (16-bit greys too)."""

    def __init__(self, root: str, img_size: int) -> None:
        self.root, self.img_size, self.loader = root, img_size, read_image
        if not (classes := class_folders(root)):
            raise FileNotFoundError(
                f"--data_path {root!r} holds no class folders (class sub-folders of images)"
            )
        seen: set[str] = set()
        self.classes, self.samples = (
            classes,
            [
                (os.path.join(folder, name), label)
                for label, c in enumerate(classes)
                for folder, files in _walk_once(os.path.join(root, c), seen)
                for name in files
                if name.lower().endswith(IMAGE_EXTENSIONS)
            ],
        )
        labels = {t for _, t in self.samples}
        if empty := [c for label, c in enumerate(classes) if label not in labels]:
            raise FileNotFoundError(
                f"class folder(s) {', '.join(empty[:5])} of {root!r} hold no images "
                f"({', '.join(IMAGE_EXTENSIONS)}), or only folders already read through a link"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise DataError(
                f"image {path!r} cannot be decoded ({type(e).__name__}: {e}); remove or replace it "
                f"and rerun"
            ) from e
        return _crop_to_tensor(image, self.img_size), label


def image_folder(data_path: str, img_size: int) -> ImageFolder:
    """The :class:`ImageFolder` of ``data_path`` (or of its ``train/``)."""
    return ImageFolder(resolve_image_root(data_path), img_size)


def tokenizer_id(tokenizer: torch.nn.Module) -> str:
    """What a tokenizer's ids depend on: ``Class sha256:<weights digest>``, or ``Class(settings)`` without weights."""
    name = type(tokenizer).__name__
    return (
        f"{name} sha256:{state_dict_digest(tokenizer)}"
        if tokenizer.state_dict()
        else f"{name}({tokenizer.extra_repr()})"
    )


def read_record(root: str) -> dict[str, Any] | None:
    """``root/meta.json`` (``None`` when absent); :class:`CacheError` when it cannot be read or trusted."""
    path = os.path.join(root, META_NAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(
            f"cache record {path!r} cannot be read ({e}); the cache files cannot be trusted: "
            f"{_start_over(root)}"
        ) from e
    need = (
        _IDENTITY
        + ("state",)
        + (_SHARD_KEYS if isinstance(rec, dict) and rec.get("format") == "consolidated" else ())
    )
    missing = [k for k in need if k not in rec] if isinstance(rec, dict) else list(need)
    if (
        missing
        or rec["format"] not in CACHE_FORMATS
        or rec["state"] not in ("incomplete", "complete")
    ):
        raise CacheError(
            f"cache record {path!r} is damaged or not main_cache.py's (missing or bad: "
            f"{missing or ['format', 'state']}); the cache files cannot be trusted: {_start_over(root)}"
        )
    return rec


def _write_record(root: str, rec: dict[str, Any]) -> None:
    atomic_write_bytes(
        os.path.join(root, META_NAME), lambda f: f.write(json.dumps(rec, indent=1).encode("utf-8"))
    )


def _checked_record(
    root: str, fmt: str, num_tokens: int, vocab_size: int | None
) -> dict[str, Any] | None:
    """The record of the ``fmt`` cache in ``root``, checked against the model (``None``: a released cache without one)."""
    path, rec = os.path.join(root, META_NAME), read_record(root)
    if rec is None:
        if fmt == "consolidated" or any(e.name.startswith("shard-") for e in os.scandir(root)):
            raise CacheError(
                f"{root!r} has no {META_NAME}, so its cache files cannot be checked: write the cache "
                f"with main_cache.py ({_start_over(root)})"
            )
        warnings.warn(
            f"token cache {root!r} has no {META_NAME} (written by the released code?): its completeness "
            f"and tokenizer cannot be checked",
            stacklevel=3,
        )
        return None
    if rec["format"] != fmt:
        raise CacheError(
            f"{path!r} describes a {rec['format']} cache, not a {fmt} one; pass --cache_format auto"
        )
    if rec["state"] != "complete":
        raise CacheError(
            f"cache {root!r} is incomplete ({path!r}: its writer stopped, or is still running, before "
            f"every image was encoded); rerun main_cache.py with the same command to finish it"
        )
    if int(rec["num_tokens"]) != num_tokens:
        g = math.isqrt(num_tokens)
        raise CacheError(
            f"cache {path!r} holds {rec['num_tokens']} tokens per image (img_size {rec['img_size']}), but "
            f"the model's token grid has {num_tokens} ({g}x{g}); check --img_size and --cached_path"
        )
    if vocab_size is not None and int(rec["vocab_size"]) > vocab_size:
        raise CacheError(
            f"cache {path!r} was written with a {rec['vocab_size']}-code tokenizer, larger than the "
            f"model's vocabulary ({vocab_size}); check --cached_path and the model's vocab_size"
        )
    return rec


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest signed integer type of the consolidated layout that holds ids ``< vocab_size``."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def _check_tokens(
    arr: np.ndarray, num_tokens: int, vocab_size: int | None, where: str
) -> np.ndarray:
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


def _cached_files(root: str, class_name: str) -> list[str]:
    """The ``.npz`` files of a class folder of the released layout, by path in the class folder."""
    top = os.path.join(root, class_name)
    return [
        os.path.join(folder[len(top) + 1 :], name)
        for folder, files in _walk_once(top, set())
        for name in files
        if name.endswith(".npz")
    ]


class _TokenCache(torch.utils.data.Dataset):
    """Items ``(tokens int64 [2, num_tokens], label)``, the tokens checked by ``self.load(index)``; row 1: flipped."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.load(index)), int(self.labels[index])


class ReleasedTokenCache(_TokenCache):
    """The released layout."""

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        if not os.path.isdir(root):
            raise CacheError(f"cache folder {root!r} does not exist; write it with main_cache.py")
        self.root, self.num_tokens, self.vocab_size = root, num_tokens, vocab_size
        rec = _checked_record(root, "released", num_tokens, vocab_size)
        recorded = list(rec["classes"]) if rec is not None else []
        disk = sorted(
            e.name
            for e in os.scandir(root)
            if e.is_dir() and (_visible(e.name) or e.name in recorded)
        )
        if rec is not None and set(disk) != set(
            recorded
        ):  # labels are the record's: a stray folder shifts none
            extra, missing = sorted(set(disk) - set(recorded)), sorted(set(recorded) - set(disk))
            raise CacheError(
                f"the class folders of cache {root!r} differ from its {META_NAME} (on disk only: "
                f"{extra[:5]}, recorded only: {missing[:5]}); move the extra folders away, or "
                f"{_start_over(root)}"
            )
        self.classes = recorded or disk
        per_class = [_cached_files(root, c) for c in self.classes]
        self.files = [
            os.path.join(root, c, n) for c, names in zip(self.classes, per_class) for n in names
        ]
        if not self.files:
            raise CacheError(
                f"cache folder {root!r} holds no class folders of .npz files; write it with main_cache.py"
            )
        if rec is not None and len(self.files) != int(rec["num_images"]):
            raise CacheError(
                f"cache {root!r} holds {len(self.files)} .npz files but its {META_NAME} lists "
                f"{rec['num_images']} images; rerun main_cache.py with the same command to rewrite "
                f"missing files, or {_start_over(root)}"
            )
        self.labels = np.repeat(
            np.arange(len(per_class), dtype=np.int64), [len(n) for n in per_class]
        )
        self.load(0)

    def load(self, index: int) -> np.ndarray:
        where = f"cache file {self.files[index]!r}"
        try:
            with np.load(self.files[index], allow_pickle=False) as z:
                names, arrays = z.files, [z[k] for k in ("indices", "indices_flip") if k in z.files]
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise CacheError(
                f"{where} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated: delete it "
                f"and rerun main_cache.py with the same command, which rewrites missing files"
            ) from e
        if len(arrays) != 2:
            raise CacheError(
                f"{where} holds {names}, not the released layout's 'indices' and 'indices_flip'"
            )
        return np.stack([_check_tokens(a, self.num_tokens, self.vocab_size, where) for a in arrays])


def _shard_names(root: str, shard: int) -> dict[str, str]:
    """The shard's files; ``done`` is the per-row done mask of an unfinished shard."""
    base = os.path.join(root, f"shard-{shard:05d}")
    return {
        k: f"{base}.{k}.npy" + (".partial" if k == "done" else "")
        for k in ("tokens", "labels", "index", "done")
    }


class ConsolidatedTokenCache(_TokenCache):
    """The consolidated layout, in ImageFolder order; shards are memory-mapped lazily in each process."""

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        self.root, self.num_tokens, self.vocab_size = root, num_tokens, vocab_size
        rec = _checked_record(root, "consolidated", num_tokens, vocab_size)
        self.classes, self.paths = (
            list(rec["classes"]),
            [_shard_names(root, s) for s in range(int(rec["num_shards"]))],
        )
        parts = []
        fix = "delete the shard's files and rerun main_cache.py with the same command"
        for names in self.paths:
            try:
                toks = np.load(names["tokens"], mmap_mode="r")
                lab, index = np.load(names["labels"]), np.load(names["index"])
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise CacheError(
                    f"cache shard {names['tokens']!r} or its labels / index cannot be read ({e}); {fix}"
                ) from e
            if toks.shape[1:] != (2, num_tokens) or not lab.shape == index.shape == toks.shape[:1]:
                raise CacheError(
                    f"cache shard {names['tokens']!r} has shape {list(toks.shape)} (labels {list(lab.shape)}, "
                    f"index {list(index.shape)}), expected [M, 2, {num_tokens}] ([M], [M]); {fix}"
                )
            parts.append((index.astype(np.int64), lab.astype(np.int64)))
        order, labels = zip(*parts)
        index_all = np.concatenate(order)
        perm = np.argsort(index_all, kind="stable")
        if not np.array_equal(index_all[perm], np.arange(int(rec["num_images"]))):
            raise CacheError(
                f"the shards of {root!r} do not hold images 0..{int(rec['num_images']) - 1} once each; "
                f"the cache is damaged: {_start_over(root)}"
            )
        self.shard = np.repeat(np.arange(len(order), dtype=np.int64), [len(o) for o in order])[perm]
        self.row = np.concatenate([np.arange(len(o), dtype=np.int64) for o in order])[perm]
        self.labels = np.concatenate(labels)[perm]
        self._mm: list[np.ndarray] | None = None
        self.load(0)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}  # never pickle memory maps into workers

    def load(self, index: int) -> np.ndarray:
        if self._mm is None:
            self._mm = [np.load(p["tokens"], mmap_mode="r") for p in self.paths]
        s, r = int(self.shard[index]), int(self.row[index])
        where = f"cache shard file {self.paths[s]['tokens']!r} (row {r})"
        return _check_tokens(
            np.asarray(self._mm[s][r]), 2 * self.num_tokens, self.vocab_size, where
        ).reshape(2, -1)


def open_token_cache(
    root: str, num_tokens: int, vocab_size: int | None = None, cache_format: str = "auto"
):
    """Open and check a token cache of either layout (``auto`` detects it): record, files and first item."""
    if not os.path.isdir(root):
        raise CacheError(
            f"--cached_path {root!r} does not exist; write the cache with main_cache.py"
        )
    auto = cache_format in (None, "", "auto")
    fmt = (read_record(root) or {"format": "released"})["format"] if auto else cache_format
    if fmt not in CACHE_FORMATS:
        raise ValueError(
            f"unknown cache format {cache_format!r}; use auto, released or consolidated"
        )
    return (ReleasedTokenCache if fmt == "released" else ConsolidatedTokenCache)(
        root, num_tokens, vocab_size
    )


@dataclass
class CacheStats:
    """What one rank did: images encoded now, and images found already done."""

    written: int = 0
    skipped: int = 0


def _shard_plan(num_images: int, world_size: int, shard_size: int | None) -> tuple[int, int]:
    """``(num_shards, shard_size)``; by default a multiple of the world size, at most 2**18 images each."""
    if not shard_size or shard_size <= 0:
        per = world_size * max(1, math.ceil(num_images / (world_size * 262144)))
        shard_size = max(1, math.ceil(num_images / per))
    return max(1, math.ceil(num_images / shard_size)), shard_size


def _show(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 48 else r[:45] + "..."


def _check_rerun(root: str, want: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an earlier run into ``root`` with the inputs of ``want``; anything else is refused."""
    rec = read_record(root)
    if rec is None:
        if any(not e.name.startswith(TMP_PREFIX) for e in os.scandir(root)):
            raise CacheError(
                f"{root!r} holds files but no {META_NAME}, so they cannot be checked (not main_cache.py's, "
                f"or its record was deleted): {_start_over(root)}"
            )
        return None
    keys = _IDENTITY + tuple(k for k in want if k not in _IDENTITY)  # and the caller's extras
    diffs = [
        f"{k} {_show(rec.get(k))} there, {_show(want[k])} now"
        for k in keys
        if rec.get(k) != want[k]
    ]
    if diffs:
        raise CacheError(
            f"{root!r} holds a cache of other inputs ({'; '.join(diffs)}); a rerun must use the same "
            f"ones: {_start_over(root)}"
        )
    return rec


class _ConsolidatedWriter:
    """This rank's unfinished shards: filled row by row, renamed into place once every row is done."""

    def __init__(self, root: str, rec: dict[str, Any], shards: Sequence[int]) -> None:
        self.root, self.rec, self.size = root, rec, int(rec["shard_size"])
        self.todo: dict[
            int, np.ndarray
        ] = {}  # unfinished shard -> ImageFolder indices not encoded yet
        self.open: dict[
            int, tuple[np.ndarray, np.ndarray]
        ] = {}  # shard -> (tokens, done mask), memory-mapped
        for s in shards:
            names, (lo, hi) = _shard_names(root, s), self.bounds(s)
            tok_p, done_p = names["tokens"] + ".partial", names["done"]
            if os.path.isfile(names["tokens"]):
                continue
            self.todo[s] = np.arange(lo, hi)
            if not (os.path.isfile(tok_p) and os.path.isfile(done_p)):
                continue
            toks, done = (
                np.lib.format.open_memmap(tok_p, mode="r+"),
                np.lib.format.open_memmap(done_p, mode="r+"),
            )
            if done.shape != (hi - lo,):
                raise CacheError(
                    f"unfinished shard file {done_p!r} does not fit this cache: {_start_over(root)}"
                )
            if toks.shape != (hi - lo, 2, int(rec["num_tokens"])) or toks.dtype != np.dtype(
                rec["dtype"]
            ):
                raise CacheError(
                    f"unfinished shard file {tok_p!r} does not fit this cache: {_start_over(root)}"
                )
            self.open[s], self.todo[s] = (toks, done), np.flatnonzero(done == 0) + lo

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.size, min(int(self.rec["num_images"]), (s + 1) * self.size)

    def start(self, labels: np.ndarray) -> None:
        """Create the ``*.partial`` files of the shards not begun yet; write every unfinished shard's labels and index."""
        for s in self.todo:
            names, (lo, hi) = _shard_names(self.root, s), self.bounds(s)
            if s not in self.open:
                shape, dtype = (
                    (hi - lo, 2, int(self.rec["num_tokens"])),
                    np.dtype(self.rec["dtype"]),
                )
                self.open[s] = (
                    np.lib.format.open_memmap(names["tokens"] + ".partial", "w+", dtype, shape),
                    np.lib.format.open_memmap(names["done"], "w+", np.uint8, (hi - lo,)),
                )
            for key, arr in (
                ("labels", labels[lo:hi]),
                ("index", np.arange(lo, hi, dtype=np.int64)),
            ):
                atomic_write_bytes(names[key] + ".partial", lambda f, a=arr: np.save(f, a))

    def commit(self, indices: Sequence[int], tokens: np.ndarray) -> None:
        """Write and flush the rows of ``indices``, then mark them done; finish the shards that are complete."""
        for k, values in (
            (0, tokens),
            (1, [1] * len(indices)),
        ):  # tokens flushed before their done marks
            for i, v in zip(indices, values):
                self.open[i // self.size][k][i % self.size] = v
            for s in sorted({i // self.size for i in indices}):
                self.open[s][k].flush()
        self.finish_complete()

    def finish_complete(self) -> None:
        for s in [s for s, (_, done) in self.open.items() if bool(done.all())]:
            toks, done = self.open.pop(s)
            toks.flush()
            with open(toks.filename, "rb+") as f:
                os.fsync(f.fileno())
            del toks, done
            names = _shard_names(self.root, s)
            for key in (
                "labels",
                "index",
                "tokens",
            ):  # tokens last: its presence marks the shard complete
                os.replace(names[key] + ".partial", names[key])
            os.unlink(names["done"])


def _decode_errors(loader: Callable[[str], Any], paths: list[str]) -> list[str]:
    """``'path (error)'`` for each of ``paths`` that ``loader`` cannot decode (run in DataLoader workers)."""
    bad = []
    for path in paths:
        try:
            loader(path)
        except Exception as e:  # noqa: BLE001 - reported with the path
            bad.append(f"{path} ({type(e).__name__}: {e})")
    return bad


def _check_decodable(dataset, paths: list[str], num_workers: int, progress: bool) -> None:
    """Decode every image of ``paths`` with ``dataset.loader``; one :class:`CacheError` lists those that fail."""
    batches = torch.utils.data.DataLoader(
        paths,
        batch_size=64,
        num_workers=num_workers,
        collate_fn=functools.partial(_decode_errors, dataset.loader),
    )
    bad = [
        e
        for b in tqdm(
            batches, desc="checking that the images decode", disable=not (progress and paths)
        )
        for e in b
    ]
    if bad:
        raise CacheError(
            f"{len(bad)} image file(s) cannot be decoded, nothing was encoded: {'; '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; remove or replace them (a new set of images needs another "
            f"--cached_path) and rerun"
        )


def _complete(root: str, rec: dict[str, Any], names: Sequence[str], classes: Sequence[str]) -> bool:
    if rec["format"] == "consolidated":
        return all(
            os.path.isfile(_shard_names(root, s)["tokens"]) for s in range(int(rec["num_shards"]))
        )
    have = {
        os.path.join(c, n) for c in classes for n in _cached_files(root, c)
    }  # every rank made every class folder
    return all(n + ".npz" in have for n in names)


def _image_names(dataset, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> list[str]:
    """``class/path in the class folder`` of each image (distinct: the released layout's file names)."""
    root = getattr(dataset, "root", None)
    tops = [os.path.join(root, c, "") if root else None for c in classes]
    names = [
        os.path.join(
            classes[t],
            p[len(tops[t]) :] if tops[t] and p.startswith(tops[t]) else os.path.basename(p),
        )
        for p, t in samples
    ]
    if len(set(names)) != len(names):
        dup = next(n for n, k in collections.Counter(names).items() if k > 1)
        raise CacheError(
            f"two images would share the cache file {dup}.npz (the same file name in one class); "
            f"rename one of them"
        )
    return names


def write_token_cache(
    dataset,
    cached_path: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache_format: str,
    *,
    tokenizer: str,
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
    extra: dict[str, Any] | None = None,
) -> CacheStats:
    """Encode this rank's share of ``dataset`` (ImageFolder API: ``samples``, ``classes``, ``loader``) into ``cached_path``.

    ``encode``: images ``[B, 3, S, S]`` in [-1, 1] -> ids ``[B, h, w]``; ``tokenizer`` is its
    :func:`tokenizer_id`; ``extra``: more records for ``meta.json`` (JSON values; a rerun must give
    the same).
    """
    if cache_format not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format {cache_format!r}; use one of {CACHE_FORMATS}")
    samples, classes = list(dataset.samples), list(dataset.classes)
    if not (n := len(samples)):
        raise CacheError("the ImageFolder holds no images")
    names = _image_names(dataset, samples, classes)
    listing = "".join(n.replace(os.sep, "/") + "\n" for n in names)
    want: dict[str, Any] = dict(
        format=cache_format,
        tokenizer=tokenizer,
        img_size=img_size,
        crop=CROP,
        num_tokens=num_tokens,
        vocab_size=vocab_size,
        num_images=n,
        classes=classes,
        images="sha256:" + hashlib.sha256(listing.encode()).hexdigest(),
        **(extra or {}),
    )
    os.makedirs(cached_path, exist_ok=True)
    old = _check_rerun(cached_path, want)
    writer = None
    if cache_format == "released":
        mine = list(range(rank, n, world_size))
        targets = {i: os.path.join(cached_path, names[i] + ".npz") for i in mine}
        todo = [i for i in mine if not os.path.isfile(targets[i])]
    else:
        num_shards, size = (
            (old["num_shards"], old["shard_size"])
            if old
            else _shard_plan(n, world_size, shard_size)
        )
        want.update(
            num_shards=num_shards, shard_size=size, dtype=token_dtype(vocab_size).name
        )  # the first run's plan
        writer = _ConsolidatedWriter(cached_path, want, range(rank, num_shards, world_size))
        mine = [i for s in range(rank, num_shards, world_size) for i in range(*writer.bounds(s))]
        todo = sorted(int(i) for rows in writer.todo.values() for i in rows)
    _check_decodable(dataset, [samples[i][0] for i in todo], num_workers, progress and rank == 0)
    barrier()
    if rank == 0:
        _write_record(cached_path, {**want, "state": "incomplete"})
    barrier()
    if writer is None:
        for cls in classes:
            os.makedirs(os.path.join(cached_path, cls), exist_ok=True)
    else:
        writer.start(np.asarray([t for _, t in samples], dtype=np.int64))
    if todo:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, todo),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=torch.device(device).type == "cuda",
        )
        for k, (images, _) in enumerate(
            tqdm(
                loader,
                desc=f"caching ({cache_format}, rank 0 of {world_size})",
                disable=not progress or rank != 0,
            )
        ):
            images = images.to(device, non_blocking=True)
            with torch.no_grad():
                toks = encode(torch.cat([images, images.flip(-1)]))
            if toks[0].numel() != num_tokens:
                raise CacheError(
                    f"the tokenizer gives {toks[0].numel()} tokens per image, expected {num_tokens}"
                )
            toks = (
                toks.reshape(2, images.shape[0], -1).transpose(0, 1).cpu().numpy().astype(np.int64)
            )  # [B, 2, N]
            idx = todo[k * batch_size : (k + 1) * batch_size]
            if writer is None:
                for i, t in zip(idx, toks):
                    atomic_write_bytes(
                        targets[i], lambda f, t=t: np.savez(f, indices=t[0], indices_flip=t[1])
                    )
            else:
                writer.commit(idx, toks)
    if writer is not None:
        writer.finish_complete()
    barrier()
    if read_record(cached_path)["state"] != "complete" and _complete(
        cached_path, want, names, classes
    ):
        _write_record(cached_path, {**want, "state": "complete"})
    return CacheStats(written=len(todo), skipped=len(mine) - len(todo))
