"""Caption data in the formats people have, as ``(key, image, captions)``:

* ``folder``: images (jpg, jpeg, png, webp; sub-folders too) with same-stem ``.txt`` captions;
* ``jsonl``: a manifest of ``{"image": path relative to it, "caption": text or [texts]}``;
* ``wds``: webdataset tar shards (a ``.tar``, a folder of them, or a brace pattern such as
  ``a-{000..009}.tar``): ``jpg|jpeg|png|webp`` with ``txt`` or ``json`` (``{"caption": ...}``).

Bad inputs are skipped and counted in a :class:`CaptionReport`, never dropped silently: an image
without a caption, empty captions, undecodable text or manifest lines, missing images, a tar shard
cut in the middle (its complete samples are kept); captions over ``max_text_tokens`` are truncated
and counted. :class:`CaptionStream` streams tar shards for training without a cache.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from lpd.config import derive_seed
from lpd.images import CacheError, ImageFileError, center_crop_arr, image_to_tensor
from lpd.text.encoders import TextEncoder

__all__ = [
    "CAPTION_FORMATS",
    "CaptionDataError",
    "CaptionReport",
    "Item",
    "detect_format",
    "scan_captions",
    "iter_captions",
    "open_image",
    "CaptionStream",
    "caption_choice",
]

CAPTION_FORMATS = ("folder", "jsonl", "wds")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CaptionDataError(CacheError):
    """Caption data that cannot be read, or a caption cache that does not fit."""


@dataclass
class CaptionReport:
    """What reading the data skipped or changed (keys or ``file: why``); ``images``: the images
    kept."""

    images: int = 0
    no_caption: list[str] = field(default_factory=list)
    empty_captions: int = 0
    bad_text: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    cut_shards: list[str] = field(default_factory=list)
    truncated: int = 0

    def summary(self) -> str:
        parts = [
            f"{len(v) if isinstance(v, list) else v} {k.replace('_', ' ')}"
            + (
                f" ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                if isinstance(v, list) and v
                else ""
            )
            for k, v in vars(self).items()
            if k != "images" and v
        ]
        return f"{self.images} images with captions" + (f"; {'; '.join(parts)}" if parts else "")


@dataclass
class Item:
    """One image: its key, where its bytes are (a file, or ``shard.tar/member``) and its
    captions."""

    key: str
    ref: str
    captions: list[str]


def _captions(value: Any) -> list[str] | None:
    """A caption value (text or list of texts) stripped, or None when it is not one."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    return None


def _parse_caption(data: bytes, ext: str) -> list[str] | None:
    """Captions of a ``txt`` (the whole text) or ``json`` (``{"caption": ...}``) member; None if
    unreadable."""
    try:
        text = data.decode("utf-8")
        return [text.strip()] if ext == "txt" else _captions(json.loads(text).get("caption"))
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None


def _keep(
    key: str, ref: str, caps: list[str] | None, report: CaptionReport, items: list[Item]
) -> None:
    if caps is None:
        report.no_caption.append(key)
        return
    kept = [c for c in caps if c]
    report.empty_captions += len(caps) - len(kept)
    if kept:
        items.append(Item(key, ref, kept))
    elif caps:
        report.no_caption.append(key)


def detect_format(path: str) -> str:
    """``jsonl`` for a ``.jsonl`` file, ``wds`` for a ``.tar``, a brace pattern or a folder of
    ``.tar`` files, ``folder`` for another folder."""
    if not path:
        raise CaptionDataError("--data_path is missing: give the caption data")
    if path.endswith(".jsonl") and os.path.isfile(path):
        return "jsonl"
    if (
        path.endswith(".tar")
        or "{" in path
        or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.tar")))
    ):
        return "wds"
    if os.path.isdir(path):
        return "folder"
    raise CaptionDataError(
        f"--data_path {path!r}: give a folder of images with .txt captions, a .jsonl manifest, "
        f"or webdataset .tar shards (a file, a folder of them or a pattern like a-{{000..009}}.tar)"
    )


def shard_list(path: str) -> list[str]:
    """The tar shards of a ``.tar`` path, a brace pattern or a folder, in order."""
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
    else:
        from braceexpand import braceexpand

        shards = list(braceexpand(path))
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        raise CaptionDataError(
            f"--data_path {path!r}: tar shards missing ({missing[:3] or 'none found'}); check "
            f"the path or pattern"
        )
    return shards


def _split(name: str) -> tuple[str, str]:
    """webdataset's key and extension of a member: up to / after the first dot of its base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _scan_folder(root: str, report: CaptionReport, items: list[Item]) -> None:
    """Images under ``root`` in the order of their relative paths, each with its same-stem
    ``.txt``."""
    images = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if _split(f)[1] in IMAGE_EXTS
    )
    for rel in images:
        key = _split(rel)[0]
        txt, caps = os.path.join(root, key + ".txt"), None
        if os.path.isfile(txt):
            with open(txt, "rb") as f:
                caps = _parse_caption(f.read(), "txt")
            if caps is None:
                report.bad_text.append(f"{txt}: not UTF-8 text")
                continue
        _keep(key, os.path.join(root, rel), caps, report, items)


def _scan_jsonl(path: str, report: CaptionReport, items: list[Item]) -> None:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                row = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, ValueError):
                row = False
            if row is None:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                report.bad_text.append(
                    f"{path} line {line_no}: not a JSON object with an 'image' path"
                )
                continue
            image = os.path.join(root, row["image"])
            if not os.path.isfile(image):
                report.missing_images.append(f"{path} line {line_no}: {row['image']}")
                continue
            caps = _captions(row.get("caption"))
            if caps is None and "caption" in row:
                report.bad_text.append(
                    f"{path} line {line_no}: 'caption' is not text or a list of texts"
                )
                continue
            _keep(os.path.splitext(row["image"])[0], image, caps, report, items)


def _scan_tar(
    shard: str, report: CaptionReport, members: dict[str, tuple[str, int, int]]
) -> list[Item]:
    """Items of one shard; ``members`` gets ``ref -> (shard, offset, size)`` of their images."""
    size, found, order = os.path.getsize(shard), {}, []
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                key, ext = _split(m.name)
                if key not in found:
                    found[key] = {}
                    order.append(key)
                found[key][ext] = tf.extractfile(m).read() if ext in ("txt", "json") else m
    except (tarfile.TarError, EOFError, OSError) as e:
        report.cut_shards.append(f"{shard}: {e}")
    items: list[Item] = []
    for key in order:
        parts, img = found[key], next((e for e in IMAGE_EXTS if e in found[key]), None)
        if img is None:
            continue
        ref = os.path.join(shard, parts[img].name)
        members[ref] = (shard, parts[img].offset_data, parts[img].size)
        text = next((e for e in ("txt", "json") if e in parts), None)
        caps = None if text is None else _parse_caption(parts[text], text)
        if text is not None and caps is None:
            report.bad_text.append(
                f"{shard}: {key}.{text} is not UTF-8 text / a JSON object with 'caption'"
            )
            continue
        _keep(key, ref, caps, report, items)
    return items


def scan_captions(
    path: str, fmt: str = "auto"
) -> tuple[list[Item], CaptionReport, dict[str, tuple[str, int, int]]]:
    """Items of the data at ``path`` (in its order), the report, and the tar members of ``wds``
    images."""
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    if fmt not in CAPTION_FORMATS:
        raise CaptionDataError(f"--captions {fmt!r}: use auto, {', '.join(CAPTION_FORMATS)}")
    report, items, members = CaptionReport(), [], {}
    if fmt == "folder":
        if not os.path.isdir(path):
            raise CaptionDataError(
                f"--data_path {path!r} is not a folder of images with .txt captions"
            )
        _scan_folder(path, report, items)
    elif fmt == "jsonl":
        if not os.path.isfile(path):
            raise CaptionDataError(f"--data_path {path!r} is not a JSONL manifest file")
        _scan_jsonl(path, report, items)
    else:
        for shard in shard_list(path):
            items += _scan_tar(shard, report, members)
    report.images = len(items)
    return items, report, members


def _read(ref: str, members: dict[str, tuple[str, int, int]]) -> bytes:
    if ref in members:
        shard, offset, size = members[ref]
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    with open(ref, "rb") as f:
        return f.read()


def _decode(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageFileError(f"not a readable image ({type(e).__name__})") from e


def open_image(ref: str, members: dict[str, tuple[str, int, int]]) -> Image.Image:
    """The RGB image of an item's ``ref`` (a file, or a tar member of ``members``)."""
    return _decode(_read(ref, members))


def _wds_samples(shards: Sequence[str], report: CaptionReport) -> Iterator[dict]:
    """webdataset's samples of the shards (cut shards reported once each, their complete samples
    kept)."""
    import webdataset as wds

    def handler(e: Exception) -> bool:
        where = next((s for s in shards if s in repr(e)), repr(e))
        if not any(c.startswith(where + ":") for c in report.cut_shards):
            report.cut_shards.append(f"{where}: {type(e).__name__}")
        return True

    yield from wds.DataPipeline(
        wds.SimpleShardList(list(shards)), wds.tarfile_to_samples(handler=handler)
    )


def iter_captions(
    path: str, fmt: str = "auto", report: CaptionReport | None = None
) -> Iterator[tuple[str, Image.Image, list[str]]]:
    """``(key, RGB image, captions)`` of every usable image at ``path``; tar shards are read with
    webdataset. What is skipped is counted in ``report``."""
    report = CaptionReport() if report is None else report
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    if fmt != "wds":
        items, rep, _ = scan_captions(path, fmt)
        vars(report).update({k: v for k, v in vars(rep).items() if k != "images"})
        pairs = ((it.key, it.ref, it.captions) for it in items)
    else:
        pairs = _wds_items(_wds_samples(shard_list(path), report), report)
    for key, ref, caps in pairs:
        try:
            image = _decode(ref) if isinstance(ref, bytes) else open_image(ref, {})
        except Exception as e:  # noqa: BLE001 - counted with the key
            report.bad_images.append(f"{key}: {type(e).__name__}")
            continue
        report.images += 1
        yield key, image, caps


def _wds_items(
    samples: Iterator[dict], report: CaptionReport
) -> Iterator[tuple[str, bytes, list[str]]]:
    for s in samples:
        img, text = (
            next((e for e in exts if e in s), None) for exts in (IMAGE_EXTS, ("txt", "json"))
        )
        if img is None:
            continue
        caps = None if text is None else _parse_caption(s[text], text)
        if text is not None and caps is None:
            report.bad_text.append(f"{s['__url__']}: {s['__key__']}.{text}")
            continue
        kept: list[Item] = []
        _keep(s["__key__"], "", caps, report, kept)
        if kept:
            yield s["__key__"], s[img], kept[0].captions


def caption_choice(seed: int, epoch: int, index: int, count: int) -> int:
    """Which of an image's ``count`` captions epoch ``epoch`` uses: a function of (seed, epoch,
    index)."""
    return derive_seed(seed, epoch, index) % count if count > 1 else 0


class CaptionStream(torch.utils.data.IterableDataset):
    """Training without a cache: ``(image float32 [3, S, S] in [-1, 1], ids int64
    [max_text_tokens], mask)`` streamed from tar shards with webdataset. Process ``rank`` reads the
    shards ``rank::world_size`` that hold a captioned image, scanned once (headers and captions) for
    :attr:`report` and the count; an epoch is ``len(self)`` samples over all processes, as a
    cache's: a process cycles through its shards (in an order drawn from (seed, epoch, rank)) when
    they hold fewer. Its readers (DataLoader workers) read disjoint shards and step ``s`` is reader
    ``s % readers``'s batch, so a resumed epoch skips the consumed samples and goes on with the same
    batches. A key's caption is chosen from (seed, epoch, key); undecodable images are skipped and
    reported on stderr."""

    def __init__(
        self,
        path: str,
        img_size: int,
        encoder: TextEncoder,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        shards = shard_list(path)
        if len(shards) < world_size:
            raise CaptionDataError(
                f"--data_path {path!r} holds {len(shards)} tar shard(s) for {world_size} "
                f"processes, which read their own shards: split the data into more shards"
            )
        self.report, counts = CaptionReport(), {}
        for shard in shards[rank::world_size]:
            items = _scan_tar(shard, self.report, {})
            counts[shard] = len(items)
            self.report.truncated += encoder.token_ids([c for it in items for c in it.captions])[1]
        self.report.images = sum(counts.values())
        own = torch.zeros(world_size, dtype=torch.int64, device=device)
        own[rank] = self.report.images
        if world_size > 1:  # every process learns every count (and refuses alike)
            torch.distributed.all_reduce(own)
        if not own.all():
            raise CaptionDataError(
                f"--data_path {path!r}: the shards of process {int(own.argmin())} of "
                f"{world_size} hold no image with a caption (per process: {own.tolist()}); give "
                f"each process shards with captioned images"
            )
        self.shards, self.total = [s for s, n in counts.items() if n], int(own.sum())
        self.img_size, self.encoder, self.seed, self.rank = img_size, encoder, seed, rank
        self.epoch = self.start = 0
        self.steps, self.batch, self.readers = -(-self.total // world_size), 1, 1

    def __len__(self) -> int:
        return self.total

    def loader(self, sampler: Any, num_workers: int, **kw: Any) -> torch.utils.data.DataLoader:
        """The DataLoader of the epoch, start step, steps and batch size of ``sampler`` (an
        ``EpochBatchSampler``), with at most one worker per shard."""
        self.epoch, self.start, self.steps = sampler.epoch, sampler.start_step, sampler.steps
        self.batch, self.readers = sampler.batch_size, max(1, min(num_workers, len(self.shards)))
        workers = min(num_workers, self.readers)
        return torch.utils.data.DataLoader(self, self.batch, num_workers=workers, **kw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        reader = (self.start + (0 if info is None else info.id)) % self.readers
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, 0))
        order = torch.randperm(len(self.shards), generator=gen)[reader :: self.readers]
        done, stop = (
            len(range(reader, n, self.readers)) * self.batch for n in (self.start, self.steps)
        )
        yield from itertools.islice(self._cycle([self.shards[i] for i in order]), done, stop)

    def _cycle(
        self, shards: list[str]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The samples of ``shards``, over and over."""
        while True:
            kept = 0
            for key, data, caps in _wds_items(_wds_samples(shards, self.report), self.report):
                try:
                    image = image_to_tensor(center_crop_arr(_decode(data), self.img_size))[0]
                except ImageFileError as e:
                    self.report.bad_images.append(key)
                    print(
                        f"warning: epoch {self.epoch}: skipped {key} ({e}); "
                        f"{len(self.report.bad_images)} so far in {shards[0]} and its "
                        f"{len(shards) - 1} other shard(s)",
                        file=sys.stderr,
                    )
                    continue
                index = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:7], "little")
                caption = caps[caption_choice(self.seed, self.epoch, index, len(caps))]
                ids, mask = self.encoder.pad(
                    self.encoder.token_ids([caption])[0], self.encoder.max_text_tokens
                )
                kept += 1
                yield image, ids[0], mask[0]
            if not kept:
                raise CaptionDataError(
                    f"no readable image with a caption in the tar shards {shards[:3]}: "
                    f"{self.report.summary()}"
                )
