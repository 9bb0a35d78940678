"""The caption cache: a consolidated token cache (``lpd.datasets``: image tokens and their flips,
the same records, resumable) whose ``meta.json`` also records ``captions`` (text encoder,
max_text_tokens, digest of the texts), with ``captions.npz`` (token ids ``[C, max_text_tokens]``,
lengths, per-image offsets, keys) and on request ``captions.features.npy`` (float16 encoder
features ``[C, max_text_tokens, width]``). An undecodable image stops it before anything is
encoded. Flipped tokens keep their captions (words such as "left" are not mirrored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lpd.datasets import (
    CacheJob,
    tokenizer_id,
    write_token_cache,
)
from lpd.files import atomic_write_bytes
from lpd.images import center_crop_arr, image_to_tensor
from lpd.text.data import (
    CAPTION_FORMATS,
    CaptionDataError,
    Item,
    open_image,
    scan_captions,
)
from lpd.text.encoders import MAX_TEXT_TOKENS, TextEncoder, make_text_encoder
from lpd.text.training import CAPTIONS_FILE, FEATURES_FILE

__all__ = [
    "CaptionImages",
    "write_caption_cache",
    "add_caption_args",
    "cache_captions",
]


class CaptionImages(torch.utils.data.Dataset):
    """The images of scanned items with the ImageFolder API that ``lpd.datasets.write_token_cache``
    reads."""

    def __init__(
        self, items: Sequence[Item], img_size: int, members: dict[str, tuple[str, int, int]]
    ) -> None:
        self.samples, self.classes = [(it.ref, 0) for it in items], ["images"]
        self.img_size, self.members = img_size, members

    def loader(self, ref: str) -> Image.Image:
        return open_image(ref, self.members)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return image_to_tensor(center_crop_arr(self.loader(self.samples[index][0]), self.img_size))[
            0
        ], 0


def _texts_digest(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.key, it.captions]).encode("utf-8") + b"\n")
    return "sha256:" + h.hexdigest()


def _write_caption_files(
    root: str, items: Sequence[Item], encoder: TextEncoder, features: bool, batch_size: int
) -> int:
    """``captions.npz`` (and the features) of ``items``; returns how many captions were
    truncated."""
    texts = [c for it in items for c in it.captions]
    ids, truncated = encoder.token_ids(texts)
    padded, mask = encoder.pad(ids, encoder.max_text_tokens)
    offsets = np.cumsum([0] + [len(it.captions) for it in items]).astype(np.int64)
    arrays = dict(
        ids=padded.numpy().astype(np.int32),
        lengths=mask.sum(1).numpy().astype(np.int32),
        offsets=offsets,
        keys=np.array([it.key for it in items]),
        truncated=np.int64(truncated),
    )
    if features:
        tmp = os.path.join(root, FEATURES_FILE + ".partial")
        out = np.lib.format.open_memmap(
            tmp, "w+", np.float16, (len(texts), encoder.max_text_tokens, encoder.width)
        )
        for a in range(0, len(texts), batch_size):
            out[a : a + batch_size] = (
                encoder.encode(padded[a : a + batch_size], mask[a : a + batch_size]).cpu().numpy()
            )
        out.flush()
        del out
        os.replace(tmp, os.path.join(root, FEATURES_FILE))
    atomic_write_bytes(os.path.join(root, CAPTIONS_FILE), lambda f: np.savez(f, **arrays))
    return truncated


def write_caption_cache(
    path: str,
    cached_path: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    encoder: TextEncoder,
    *,
    fmt: str = "auto",
    features: bool = False,
    identity: dict[str, Any],
    job: CacheJob | None = None,
):
    """Scan the caption data at ``path``, encode its images into the consolidated cache
    ``cached_path`` (``lpd.datasets.write_token_cache`` with ``identity``: ``tokenizer``,
    ``img_size``, ``num_tokens``, ``vocab_size``; this process's ``job``) and write its captions
    (rank 0). Returns ``(CacheStats, CaptionReport)``; the same command resumes."""
    job = job or CacheJob()
    items, report, members = scan_captions(path, fmt)
    if not items:
        raise CaptionDataError(
            f"--data_path {path!r} holds no image with a caption ({report.summary()})"
        )
    rec = {
        "text_encoder": encoder.record,
        "max_text_tokens": encoder.max_text_tokens,
        "num_captions": sum(len(it.captions) for it in items),
        "texts": _texts_digest(items),
        "features": bool(features),
    }
    stats = write_token_cache(
        CaptionImages(items, identity["img_size"], members),
        cached_path,
        encode,
        "consolidated",
        **identity,
        extra={"captions": rec},
        job=job,
    )
    done = os.path.isfile(os.path.join(cached_path, CAPTIONS_FILE)) and not (
        features and not os.path.isfile(os.path.join(cached_path, FEATURES_FILE))
    )  # a rerun: the same texts
    if job.rank == 0 and not done:
        report.truncated = _write_caption_files(
            cached_path, items, encoder, features, job.batch_size
        )
    elif done:
        with np.load(os.path.join(cached_path, CAPTIONS_FILE), allow_pickle=False) as z:
            report.truncated = int(z["truncated"])
    job.barrier()
    return stats, report


def add_caption_args(p: argparse.ArgumentParser) -> None:
    """main_cache.py's caption flags."""
    p.add_argument(
        "--captions",
        default=None,
        choices=["auto", *CAPTION_FORMATS],
        help="cache image-caption data (--data_path: a folder with .txt captions, a .jsonl "
        "manifest or webdataset .tar shards) instead of an ImageFolder",
    )
    p.add_argument(
        "--text_encoder",
        default="wordllama",
        help="captions: 'wordllama' or a Hugging Face encoder name or folder "
        "(e.g. google/flan-t5-xl)",
    )
    p.add_argument(
        "--max_text_tokens",
        type=int,
        default=MAX_TEXT_TOKENS,
        help="captions: longer ones are truncated",
    )
    p.add_argument(
        "--caption_features",
        action="store_true",
        help="captions: also store encoder features (float16)",
    )


def cache_captions(
    args: argparse.Namespace, vq: torch.nn.Module, info: Any, barrier: Callable[[], None]
) -> None:
    """main_cache.py --captions: the caption cache of ``args.data_path`` into
    ``args.cached_path``."""
    factor = int(getattr(vq, "downsample_factor", 16))
    encoder = make_text_encoder(
        args.text_encoder, info.device, max_text_tokens=args.max_text_tokens
    )
    stats, report = write_caption_cache(
        args.data_path,
        args.cached_path,
        vq.encode,
        encoder,
        fmt=args.captions,
        features=args.caption_features,
        identity=dict(
            img_size=args.img_size,
            tokenizer=tokenizer_id(vq),
            num_tokens=(args.img_size // factor) ** 2,
            vocab_size=int(vq.codebook_size),
        ),
        job=CacheJob.from_args(args, info, barrier),
    )
    if info.is_main:
        print(f"captions of {args.data_path}: {report.summary()}")
    print(f"[rank {info.rank}] encoded {stats.written} images, {stats.skipped} already cached")
