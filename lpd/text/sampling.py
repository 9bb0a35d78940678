"""Sampling with prompts: the text encoder a model records, and tokens of a batch of prompts
(guided by the null caption or a negative prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lpd.sampling import Decoder, SamplingConfig
from lpd.text.encoders import TextEncoder, check_encoder_record, make_text_encoder

__all__ = ["model_text_encoder", "check_prompts", "prompt_tokens"]


def model_text_encoder(model: Any, device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen text encoder ``model.config`` records (another one is refused)."""
    rec = model.config.text_encoder
    if model.text is None:
        raise ValueError("this model is class-conditional; it takes class labels, not prompts")
    if not isinstance(rec, dict):
        raise ValueError("the model does not record its text encoder; it cannot take prompts")
    name = rec["name"] if rec["kind"] == "transformers" else rec["kind"]
    encoder = make_text_encoder(name, device, max_text_tokens=model.config.max_text_tokens)
    check_encoder_record(rec, encoder, "the model")
    return encoder


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` (one string or a sequence of them) as a non-empty list of strings."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"--prompt: give one or more prompts (strings), got {prompts!r}")
    return prompts


def prompt_tokens(
    model: Any,
    encoder: TextEncoder,
    prompts: Sequence[str],
    orders: Any,
    group_sizes: Sequence[int],
    sampling: SamplingConfig,
    generator: Any = None,
    negative_prompt: str | None = None,
) -> Tensor:
    """Raster tokens ``[B, N]`` of ``prompts`` decoded over ``orders [B, N]`` in groups of
    ``group_sizes``; guidance (``sampling.cfg != 1``) against the null caption or
    ``negative_prompt``; ``generator``: one, or one per image."""
    device = model.pos_embed.device
    orders = torch.as_tensor(np.asarray(orders), device=device).long()
    ids, mask, _ = encoder.tokenize(list(prompts))
    decoder = Decoder(model, sampling)
    negative = None
    if negative_prompt is not None:
        neg_ids, neg_mask, _ = encoder.tokenize([negative_prompt])
        negative = (encoder.encode(neg_ids, neg_mask).to(device), neg_mask.to(device))
    features = encoder.encode(ids, mask).to(device)
    prefix, prefix_mask = decoder.text_prefix(features, mask.to(device), negative)
    tokens = decoder.decode(
        prefix, orders, group_sizes, prefix_mask=prefix_mask, generator=generator
    )
    return torch.empty_like(tokens).scatter_(1, orders, tokens)
