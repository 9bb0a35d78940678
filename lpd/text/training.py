"""Caption data for training a text-conditional model: the caption cache (or a dataset of
``(tokens, text, mask)`` items with a cache-like ``record``), and the frozen encoder run on the fly
on its token ids (none where it holds encoder features)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lpd.datasets import read_record
from lpd.text.cache import CaptionTokenCache
from lpd.text.data import CaptionDataError
from lpd.text.encoders import TextEncoder, check_encoder_record, make_text_encoder

__all__ = ["caption_training", "caption_batch"]


def caption_training(
    config: Any, model: Any, dataset: Any, device: torch.device
) -> tuple[Any, TextEncoder | None]:
    """The caption ``dataset`` (None: the caption cache ``config.cached_path``) of a text model and
    the encoder of its token ids (None: it holds features); ``model.config`` records the encoder."""
    where = "the dataset" if dataset is not None else f"--cached_path {config.cached_path!r}"
    if config.eval_freq:
        raise ValueError("evaluation during training is class-conditional: set --eval_freq 0")
    if dataset is None:
        if not config.use_cached:
            raise ValueError(
                "a text-conditional model trains on a caption cache: write one with "
                "main_cache.py --captions and give --use_cached --cached_path CACHE"
            )
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
    encoder = None
    if not rec.get("features"):
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
