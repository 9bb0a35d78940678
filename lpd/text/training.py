"""Caption data for training a text-conditional model: the caption cache (or a dataset of
``(tokens, text, mask)`` items with a cache-like ``record``), and the frozen encoder run on the fly
on its token ids (none where it holds encoder features)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lpd.datasets import ConsolidatedTokenCache, read_record
from lpd.text.data import CaptionDataError, CaptionStream, caption_choice, detect_format
from lpd.text.encoders import TextEncoder, check_encoder_record, make_text_encoder

__all__ = ["CaptionTokenCache", "caption_training", "caption_batch"]

CAPTIONS_FILE, FEATURES_FILE = "captions.npz", "captions.features.npy"


def caption_training(
    config: Any, model: Any, dataset: Any, device: torch.device
) -> tuple[Any, TextEncoder | None]:
    """The caption ``dataset`` (None: the caption cache ``config.cached_path``, or the tar shards
    ``config.data_path`` streamed with ``config.text_encoder``) of a text model and the encoder of
    its token ids (None: it holds features); ``model.config`` records the encoder."""
    if config.eval_freq:
        raise ValueError("evaluation during training is class-conditional: set --eval_freq 0")
    where = "the dataset" if dataset is not None else f"--cached_path {config.cached_path!r}"
    if dataset is None and not config.use_cached:
        if detect_format(config.data_path) != "wds":
            raise CaptionDataError(
                f"--data_path {config.data_path!r}: training streams webdataset .tar shards; "
                f"cache a folder or a JSONL manifest with main_cache.py --captions and give "
                f"--use_cached --cached_path CACHE"
            )
        where = f"--text_encoder {config.text_encoder!r}"
        enc = make_text_encoder(
            config.text_encoder, device, max_text_tokens=model.config.max_text_tokens
        )
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        dataset = CaptionStream(
            config.data_path,
            config.img_size,
            enc,
            seed=config.seed,
            rank=rank,
            world_size=world,
            device=device,
        )
        print(f"[rank {rank}] {len(dataset.shards)} tar shard(s): {dataset.report.summary()}")
        dataset.record = {"text_encoder": enc.record, "max_text_tokens": enc.max_text_tokens}
    elif dataset is None:
        rec = (read_record(config.cached_path) or {}).get("captions") or {}
        dataset = CaptionTokenCache(
            config.cached_path,
            model.num_tokens,
            model.vocab_size,
            seed=config.seed,
            features=bool(rec.get("features")),
        )
    rec = getattr(dataset, "record", None)
    if not isinstance(rec, dict) or not isinstance(rec.get("text_encoder"), dict):
        raise CaptionDataError(f"{where} does not record its text encoder: it holds no captions")
    enc = rec["text_encoder"]
    if enc["width"] != model.config.text_dim:
        raise ValueError(
            f"{where} holds captions of {enc['name']!r} ({enc['width']} wide) but model_config "
            f"text_dim is {model.config.text_dim}: set model_config text_dim: {enc['width']}"
        )
    encoder = getattr(dataset, "encoder", None)
    if encoder is None and not rec.get("features"):
        name = enc["name"] if enc["kind"] == "transformers" else enc["kind"]
        encoder = make_text_encoder(name, device, max_text_tokens=rec["max_text_tokens"])
        check_encoder_record(enc, encoder, where)
    model.config = replace(model.config, text_encoder=dict(enc))
    return dataset, encoder


def caption_batch(
    text: Tensor, mask: Tensor, encoder: TextEncoder | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Features ``[B, L, C]`` and mask ``[B, L]`` on ``device`` of a batch of token ids (encoded
    by ``encoder``) or features, cut to its longest caption."""
    valid = mask.any(0).nonzero()
    L = int(valid[-1]) + 1 if len(valid) else 1
    text, mask = text[:, :L].to(device), mask[:, :L].to(device)
    return (text.float() if encoder is None else encoder.encode(text, mask)), mask


class CaptionTokenCache(torch.utils.data.Dataset):
    """A caption cache: items ``(tokens int64 [2, N], text [L] int64 ids or [L, C] float32
    features, mask bool [L])`` with one of the image's captions per epoch (:meth:`set_epoch`)."""

    def __init__(
        self,
        root: str,
        num_tokens: int,
        vocab_size: int | None = None,
        *,
        seed: int = 0,
        features: bool = False,
        text_encoder: dict[str, Any] | None = None,
    ) -> None:
        self.images = ConsolidatedTokenCache(root, num_tokens, vocab_size)
        rec = read_record(root).get("captions")
        fix = "rerun main_cache.py with the same command to write them"
        if not isinstance(rec, dict):
            raise CaptionDataError(
                f"{root!r} is an image token cache without captions; write a caption cache "
                f"with main_cache.py --captions"
            )
        if text_encoder is not None and text_encoder.get("digest") != rec["text_encoder"].get(
            "digest"
        ):
            raise CaptionDataError(
                f"{root!r} holds captions of the text encoder {rec['text_encoder'].get('name')!r}, "
                f"not {text_encoder.get('name')!r}; cache them with the model's encoder"
            )
        if features and not rec["features"]:
            raise CaptionDataError(
                f"{root!r} holds caption token ids, not encoder features; rerun main_cache.py "
                f"with --caption_features into another --cached_path"
            )
        try:
            with np.load(os.path.join(root, CAPTIONS_FILE), allow_pickle=False) as z:
                self.ids, self.lengths, self.offsets = z["ids"], z["lengths"], z["offsets"]
            self.features = (
                np.load(os.path.join(root, FEATURES_FILE), mmap_mode="r") if features else None
            )
        except (OSError, ValueError, KeyError) as e:
            raise CaptionDataError(
                f"the caption files of {root!r} are missing or cannot be read ({e}); {fix}"
            ) from e
        n, c = len(self.images), int(rec["num_captions"])
        if (
            self.offsets.shape != (n + 1,)
            or self.offsets[-1] != c
            or self.ids.shape != (c, rec["max_text_tokens"])
        ):
            raise CaptionDataError(f"the caption files of {root!r} do not fit its record; {fix}")
        self.record, self.seed, self.epoch = rec, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        row = lo + caption_choice(self.seed, self.epoch, index, hi - lo)
        mask = torch.arange(self.ids.shape[1]) < int(self.lengths[row])
        text = (
            torch.from_numpy(self.ids[row].astype(np.int64))
            if self.features is None
            else torch.from_numpy(np.asarray(self.features[row], dtype=np.float32))
        )
        return self.images[index][0], text, mask
