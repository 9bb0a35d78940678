"""Prompts of an evaluation: a file of one prompt per line (``.txt``), or JSONL with a ``caption``
per line (``.jsonl``: LlamaGen's layout), blank lines skipped; image ``i`` takes prompt ``i`` modulo
their number."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lpd.sampling import Decoder
from lpd.text.encoders import TextEncoder

__all__ = ["read_prompts", "prompt_of", "PromptSet", "encode_ids"]


def read_prompts(path: str | os.PathLike) -> tuple[list[str], str]:
    """The prompts of ``path`` and the SHA-256 of its bytes; ValueError names the file and line."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--prompts {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    jsonl, prompts = path.lower().endswith(".jsonl"), []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            caption = json.loads(line).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"--prompts {path} line {n}: expected a JSON object with a non-empty string "
                f'"caption", e.g. {{"caption": "a red apple"}}'
            )
        prompts.append(caption.strip())
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line, or JSONL with caption)")
    return prompts, hashlib.sha256(data).hexdigest()


def prompt_of(prompts: list[str], index: int) -> str:
    """The prompt of image ``index``: prompts are cycled when there are more images."""
    return prompts[index % len(prompts)]


def encode_ids(encoder: TextEncoder, ids: Tensor, mask: Tensor, *_: Any) -> tuple[Tensor, Tensor]:
    """Caption ``(features [B, L, C], mask [B, L])`` on the encoder's device of padded ``ids``;
    ``encode_ids(encoder, *encoder.tokenize(prompts))`` encodes prompts."""
    return encoder.encode(ids, mask), mask.to(encoder.device)


class PromptSet:
    """The prompts of an evaluation run and the text encoder of the model, passed as ``labels`` to
    :func:`lpd.evaluate.evaluate`: ``prompts[indices]`` is the condition of those images, and
    :meth:`settings` is what a run folder records of them. Every image's caption is padded to the
    longest of the set, so an image does not depend on the batch it is drawn in."""

    def __init__(self, texts: list[str], sha256: str, file: str, encoder: TextEncoder) -> None:
        self.texts, self.sha256, self.file, self.encoder = texts, sha256, file, encoder
        self.ids, self.truncated = encoder.token_ids(texts)
        self.length = max(len(x) for x in self.ids)

    def settings(self) -> dict[str, Any]:
        return {
            "prompts_file": self.file,
            "prompts_sha256": self.sha256,
            "num_prompts": len(self.texts),
            "text_encoder": self.encoder.record,
            "max_text_tokens": self.encoder.max_text_tokens,
        }

    def __getitem__(self, indices: Any) -> PromptBatch:
        return PromptBatch(self, [int(i) for i in np.atleast_1d(indices)])

    def features(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Caption features ``[B, L, C]`` and mask ``[B, L]`` of images ``indices``."""
        ids = [self.ids[i % len(self.ids)] for i in indices]
        return encode_ids(self.encoder, *self.encoder.pad(ids, self.length))


class PromptBatch(NamedTuple):
    """The prompts of a batch of images: :meth:`sample` decodes them."""

    prompts: PromptSet
    indices: list[int]

    def sample(
        self, model: torch.nn.Module, orders: Any, sizes: Sequence[int], sampling: Any, gens: Any
    ) -> Tensor:
        """Raster tokens ``[B, N]`` of these prompts decoded over ``orders [B, N]``."""
        device = model.pos_embed.device
        decoder = Decoder(model, sampling)
        features, mask = (t.to(device) for t in self.prompts.features(self.indices))
        prefix, prefix_mask = decoder.text_prefix(features, mask)
        orders = torch.as_tensor(np.asarray(orders), device=device).long()
        tokens = decoder.decode(prefix, orders, sizes, prefix_mask=prefix_mask, generator=gens)
        return torch.empty_like(tokens).scatter_(1, orders, tokens)
