"""The token caches of ``main_cache.py``: both layouts read as ``(tokens int64 [2, h*w], label)`` in
ImageFolder order; consolidated shards hold int16 tokens (int32 for vocabularies over 32768)."""

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
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from lpd.files import TMP_PREFIX, atomic_write_bytes, state_dict_digest
from lpd.images import CacheError, DataError, image_folder, visible, walk_once

__all__ = ["open_token_cache", "write_token_cache", "CacheJob", "CacheError", "DataError"]
__all__ += ["image_folder"]

CACHE_FORMATS = ("released", "consolidated")
META_NAME = "meta.json"
CROP = "adm_center_crop"  # the crop rule of center_crop_arr, recorded in every cache
_IDENTITY = tuple(
    "format tokenizer img_size crop num_tokens vocab_size num_images classes images".split()
)
_SHARD_KEYS, _STATES = ("num_shards", "shard_size", "dtype"), ("incomplete", "complete")


def _start_over(root: str) -> str:
    return f"use another --cached_path, or delete {root!r} to start over"


def tokenizer_id(tokenizer: torch.nn.Module) -> str:
    """``Class sha256:<weights digest>``, or ``Class(settings)`` without weights."""
    name = type(tokenizer).__name__
    if tokenizer.state_dict():
        return f"{name} sha256:{state_dict_digest(tokenizer)}"
    return f"{name}({tokenizer.extra_repr()})"


def read_record(root: str) -> dict[str, Any] | None:
    """``root/meta.json`` (None when absent); CacheError when it cannot be read or trusted."""
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
    ok = isinstance(rec, dict)
    shards = _SHARD_KEYS if ok and rec.get("format") == "consolidated" else ()
    missing = [k for k in (*_IDENTITY, "state", *shards) if not ok or k not in rec]
    if missing or rec["format"] not in CACHE_FORMATS or rec["state"] not in _STATES:
        raise CacheError(
            f"cache record {path!r} is damaged or not main_cache.py's (missing or bad: "
            f"{missing or ['format', 'state']}); the cache files cannot be trusted: {_start_over(root)}"
        )
    return rec


def _write_record(root: str, rec: dict[str, Any], state: str) -> None:
    data = json.dumps({**rec, "state": state}, indent=1).encode("utf-8")
    atomic_write_bytes(os.path.join(root, META_NAME), lambda f: f.write(data))


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest signed integer type of the consolidated layout that holds ids ``< vocab_size``."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def _check_tokens(arr: np.ndarray, num_tokens: int, vocab: int | None, where: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise CacheError(f"{where}: tokens have dtype {arr.dtype}, expected integers (VQ code ids)")
    if arr.size != num_tokens:
        g = math.isqrt(num_tokens)
        raise CacheError(
            f"{where}: holds {arr.size} tokens per image, but the model's token grid has "
            f"{num_tokens} ({g}x{g}); the cache was written at another resolution or with another "
            f"tokenizer (check --img_size and --cached_path)"
        )
    flat = arr.reshape(-1).astype(np.int64, copy=False)
    if vocab is not None and flat.size and (flat.min() < 0 or flat.max() >= vocab):
        raise CacheError(
            f"{where}: token ids range over [{int(flat.min())}, {int(flat.max())}], outside the "
            f"vocabulary [0, {vocab}); the cache was written with another tokenizer"
        )
    return flat


def _cached_files(root: str, class_name: str) -> list[str]:
    """The ``.npz`` files of a class folder of the released layout, by path in the class folder."""
    top = os.path.join(root, class_name)
    return [
        os.path.join(folder[len(top) + 1 :], name)
        for folder, files in walk_once(top, set())
        for name in files
        if name.endswith(".npz")
    ]


class _TokenCache(Dataset):
    """Items ``(tokens int64 [2, num_tokens], label)`` checked by ``load``; row 1: flipped."""

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None, fmt: str) -> None:
        """Check the ``fmt`` cache's record against the model (None: a released cache lacks one)."""
        self.root, self.num_tokens, self.vocab_size = root, num_tokens, vocab_size
        path, rec = os.path.join(root, META_NAME), read_record(root)
        if rec is None:
            if fmt == "consolidated" or any(e.name.startswith("shard-") for e in os.scandir(root)):
                raise CacheError(
                    f"{root!r} has no {META_NAME}, so its cache files cannot be checked: write the "
                    f"cache with main_cache.py ({_start_over(root)})"
                )
            warnings.warn(
                f"token cache {root!r} has no {META_NAME} (written by the released code?): its completeness "
                f"and tokenizer cannot be checked",
                stacklevel=3,
            )
            self.record = None
            return
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
        self.record = rec

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.load(index)), int(self.labels[index])


class ReleasedTokenCache(_TokenCache):
    """The released layout."""

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        if not os.path.isdir(root):
            raise CacheError(f"cache folder {root!r} does not exist; write it with main_cache.py")
        super().__init__(root, num_tokens, vocab_size, "released")
        rec = self.record
        recorded = list(rec["classes"]) if rec is not None else []
        dirs = [e.name for e in os.scandir(root) if e.is_dir()]
        disk = sorted(d for d in dirs if visible(d) or d in recorded)
        # labels are the record's: a stray folder shifts none
        if rec is not None and set(disk) != set(recorded):
            extra, missing = sorted(set(disk) - set(recorded)), sorted(set(recorded) - set(disk))
            raise CacheError(
                f"the class folders of cache {root!r} differ from its {META_NAME} (on disk only: "
                f"{extra[:5]}, recorded only: {missing[:5]}); move the extra folders away, or "
                f"{_start_over(root)}"
            )
        self.classes = recorded or disk
        per_class = {c: _cached_files(root, c) for c in self.classes}
        self.files = [os.path.join(root, c, n) for c, ns in per_class.items() for n in ns]
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
        counts = [len(n) for n in per_class.values()]
        self.labels = np.repeat(np.arange(len(per_class), dtype=np.int64), counts)
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
    names = {k: f"{base}.{k}.npy" for k in ("tokens", "labels", "index", "done")}
    return names | {"done": names["done"] + ".partial"}


class ConsolidatedTokenCache(_TokenCache):
    """The consolidated layout, in ImageFolder order; shards are memory-mapped lazily in each process."""

    def __init__(self, root: str, num_tokens: int, vocab_size: int | None = None) -> None:
        super().__init__(root, num_tokens, vocab_size, "consolidated")
        rec = self.record
        self.classes = list(rec["classes"])
        self.paths = [_shard_names(root, s) for s in range(int(rec["num_shards"]))]
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
                f"the shards of {root!r} do not hold images 0..{int(rec['num_images']) - 1} once "
                f"each; the cache is damaged: {_start_over(root)}"
            )
        sizes = [len(o) for o in order]
        self.shard = np.repeat(np.arange(len(order), dtype=np.int64), sizes)[perm]
        self.row = np.concatenate([np.arange(k, dtype=np.int64) for k in sizes])[perm]
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
        row = np.asarray(self._mm[s][r])
        return _check_tokens(row, 2 * self.num_tokens, self.vocab_size, where).reshape(2, -1)


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
    layout = ReleasedTokenCache if fmt == "released" else ConsolidatedTokenCache
    return layout(root, num_tokens, vocab_size)


@dataclass(frozen=True)
class CacheJob:
    """This rank's part of a cache: batches of ``batch_size`` on ``device``; ``shard_size``: images
    a consolidated shard (None: planned); ``barrier``: the process group's."""

    rank: int = 0
    world_size: int = 1
    batch_size: int = 64
    num_workers: int = 4
    device: torch.device | str = "cpu"
    shard_size: int | None = None
    barrier: Callable[[], None] = lambda: None
    progress: bool = True

    @classmethod
    def from_args(cls, args: Any, info: Any, barrier: Callable[[], None]) -> CacheJob:
        """The job of ``main_cache.py``'s flags for the process ``info`` (rank, world, device)."""
        return cls(
            info.rank,
            info.world_size,
            args.batch_size,
            args.num_workers,
            info.device,
            args.shard_size,
            barrier,
        )


@dataclass
class CacheStats:
    """What one rank did: images encoded now, and images found already done."""

    written: int = 0
    skipped: int = 0


def _check_rerun(root: str, want: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an earlier run into ``root`` with the inputs of ``want``; anything else is refused."""
    rec = read_record(root)
    if rec is None:
        if any(not e.name.startswith(TMP_PREFIX) for e in os.scandir(root)):
            raise CacheError(
                f"{root!r} holds files but no {META_NAME}, so they cannot be checked (not "
                f"main_cache.py's, or its record was deleted): {_start_over(root)}"
            )
        return None
    keys = _IDENTITY + tuple(k for k in want if k not in _IDENTITY)  # and the caller's extras
    show = lambda v: r if len(r := repr(v)) <= 48 else r[:45] + "..."  # noqa: E731
    diffs = [f"{k} {show(rec.get(k))} there, {show(want[k])} now" for k in keys]
    if diffs := [d for k, d in zip(keys, diffs) if rec.get(k) != want[k]]:
        raise CacheError(
            f"{root!r} holds a cache of other inputs ({'; '.join(diffs)}); a rerun must use the "
            f"same ones: {_start_over(root)}"
        )
    return rec


class _ConsolidatedWriter:
    """This rank's unfinished shards: filled row by row, renamed into place once every row is done."""

    def __init__(self, root: str, rec: dict[str, Any], shards: Sequence[int]) -> None:
        self.root, self.rec, self.size = root, rec, int(rec["shard_size"])
        self.todo: dict[int, np.ndarray] = {}  # unfinished shard -> indices not encoded yet
        self.open: dict[int, tuple] = {}  # shard -> (tokens, done mask), memory-mapped
        for s in shards:
            names, (lo, hi) = _shard_names(root, s), self.bounds(s)
            tok_p, done_p = names["tokens"] + ".partial", names["done"]
            if os.path.isfile(names["tokens"]):
                continue
            self.todo[s] = np.arange(lo, hi)
            if not (os.path.isfile(tok_p) and os.path.isfile(done_p)):
                continue
            toks, done = (open_memmap(p, mode="r+") for p in (tok_p, done_p))
            shape, dtype = self.layout(s)
            bad = tok_p if toks.shape != shape or toks.dtype != dtype else None
            if bad := done_p if done.shape != shape[:1] else bad:
                msg = f"unfinished shard file {bad!r} does not fit this cache"
                raise CacheError(f"{msg}: {_start_over(root)}")
            self.open[s], self.todo[s] = (toks, done), np.flatnonzero(done == 0) + lo

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.size, min(int(self.rec["num_images"]), (s + 1) * self.size)

    def layout(self, s: int) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of shard ``s``'s tokens."""
        lo, hi = self.bounds(s)
        return (hi - lo, 2, int(self.rec["num_tokens"])), np.dtype(self.rec["dtype"])

    def start(self, labels: np.ndarray) -> None:
        """Create new shards' ``*.partial`` files; write unfinished shards' labels and index."""
        for s in self.todo:
            names, (lo, hi) = _shard_names(self.root, s), self.bounds(s)
            if s not in self.open:
                shape, dtype = self.layout(s)
                toks = open_memmap(names["tokens"] + ".partial", "w+", dtype, shape)
                self.open[s] = toks, open_memmap(names["done"], "w+", np.uint8, shape[:1])
            rows = (("labels", labels[lo:hi]), ("index", np.arange(lo, hi, dtype=np.int64)))
            for key, arr in rows:
                atomic_write_bytes(names[key] + ".partial", lambda f, a=arr: np.save(f, a))

    def commit(self, indices: Sequence[int], tokens: np.ndarray) -> None:
        """Write and flush the rows of ``indices``, then mark them done; finish complete shards."""
        for k, values in ((0, tokens), (1, [1] * len(indices))):  # tokens flushed, then marked
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
            for key in ("labels", "index", "tokens"):  # tokens last: they mark the shard complete
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
    check = functools.partial(_decode_errors, dataset.loader)
    batches = DataLoader(paths, 64, num_workers=num_workers, collate_fn=check)
    desc = "checking that the images decode"
    batches = tqdm(batches, desc=desc, disable=not (progress and paths))
    if bad := [e for b in batches for e in b]:
        raise CacheError(
            f"{len(bad)} image file(s) cannot be decoded, nothing was encoded: "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; remove or replace them (a new "
            f"set of images needs another --cached_path) and rerun"
        )


def _image_names(dataset, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> list[str]:
    """``class/path in the class folder`` of each image (distinct: the released layout's file names)."""
    root = getattr(dataset, "root", None)
    tops = [os.path.join(root, c, "") if root else None for c in classes]
    inner = [
        p[len(tops[t]) :] if tops[t] and p.startswith(tops[t]) else os.path.basename(p)
        for p, t in samples
    ]
    names = [os.path.join(classes[t], i) for (_, t), i in zip(samples, inner)]
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
    extra: dict[str, Any] | None = None,
    job: CacheJob = CacheJob(),
) -> CacheStats:
    """Encode ``job``'s share of ``dataset`` (``samples``, ``classes``, ``loader``) into
    ``cached_path`` with ``encode`` (images in [-1, 1] -> ids ``[B, h, w]``; ``tokenizer``: its
    :func:`tokenizer_id`); ``extra``: more JSON records for ``meta.json`` (a rerun gives the
    same)."""
    rank, world_size, batch_size, barrier = job.rank, job.world_size, job.batch_size, job.barrier
    if cache_format not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format {cache_format!r}; use one of {CACHE_FORMATS}")
    samples, classes = list(dataset.samples), list(dataset.classes)
    if not (n := len(samples)):
        raise CacheError("the ImageFolder holds no images")
    names = _image_names(dataset, samples, classes)
    listing = "".join(n.replace(os.sep, "/") + "\n" for n in names)
    images = "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    values = (cache_format, tokenizer, img_size, CROP, num_tokens, vocab_size, n, classes, images)
    want: dict[str, Any] = {**dict(zip(_IDENTITY, values)), **(extra or {})}
    os.makedirs(cached_path, exist_ok=True)
    old = _check_rerun(cached_path, want)
    writer = None
    if cache_format == "released":
        mine = list(range(rank, n, world_size))
        targets = {i: os.path.join(cached_path, names[i] + ".npz") for i in mine}
        todo = [i for i in mine if not os.path.isfile(targets[i])]
    else:
        # the first run's plan, else shards of job.shard_size or of at most 2**18 images, as many
        # as a multiple of the world size
        per = world_size * max(1, math.ceil(n / (world_size * 262144)))
        given = job.shard_size if job.shard_size and job.shard_size > 0 else None
        size = old["shard_size"] if old else given or max(1, math.ceil(n / per))
        num_shards = old["num_shards"] if old else max(1, math.ceil(n / size))
        want.update(num_shards=num_shards, shard_size=size, dtype=token_dtype(vocab_size).name)
        writer = _ConsolidatedWriter(cached_path, want, range(rank, num_shards, world_size))
        mine = [i for s in range(rank, num_shards, world_size) for i in range(*writer.bounds(s))]
        todo = sorted(int(i) for rows in writer.todo.values() for i in rows)
    show = job.progress and rank == 0
    _check_decodable(dataset, [samples[i][0] for i in todo], job.num_workers, show)
    barrier()
    if rank == 0:
        _write_record(cached_path, want, "incomplete")
    barrier()
    if writer is None:
        for cls in classes:
            os.makedirs(os.path.join(cached_path, cls), exist_ok=True)
    else:
        writer.start(np.asarray([t for _, t in samples], dtype=np.int64))
    if todo:
        pin = torch.device(job.device).type == "cuda"
        kw = dict(shuffle=False, num_workers=job.num_workers, pin_memory=pin)
        loader = DataLoader(Subset(dataset, todo), batch_size, **kw)
        desc = f"caching ({cache_format}, rank 0 of {world_size})"
        for k, (images, _) in enumerate(tqdm(loader, desc=desc, disable=not show)):
            images = images.to(job.device, non_blocking=True)
            with torch.no_grad():
                toks = encode(torch.cat([images, images.flip(-1)]))
            if toks[0].numel() != num_tokens:
                raise CacheError(
                    f"the tokenizer gives {toks[0].numel()} tokens per image, expected {num_tokens}"
                )
            toks = toks.reshape(2, len(images), -1).transpose(0, 1).cpu().numpy().astype(np.int64)
            idx = todo[k * batch_size : (k + 1) * batch_size]
            if writer is None:
                for i, t in zip(idx, toks):  # t: [2, N]
                    save = lambda f, t=t: np.savez(f, indices=t[0], indices_flip=t[1])  # noqa: E731
                    atomic_write_bytes(targets[i], save)
            else:
                writer.commit(idx, toks)
    if writer is not None:
        writer.finish_complete()
    barrier()
    if read_record(cached_path)["state"] != "complete":
        if writer is not None:
            files = [_shard_names(cached_path, s)["tokens"] for s in range(num_shards)]
            done = all(map(os.path.isfile, files))
        else:  # every rank made every class folder
            have = {os.path.join(c, k) for c in classes for k in _cached_files(cached_path, c)}
            done = all(k + ".npz" in have for k in names)
        if done:
            _write_record(cached_path, want, "complete")
    return CacheStats(written=len(todo), skipped=len(mine) - len(todo))
