"""CLIPScore of generated images and their prompts.

The score of one pair is ``100 * max(cos(image, text), 0)`` on the CLIP embeddings, averaged over
the pairs: the scale of torchmetrics' ``CLIPScore`` (key ``clip_score_w100``); the CLIPScore
paper's ``2.5 * max(cos, 0)`` is 0.025 times it. The CLIP model is a ``transformers`` ``CLIPModel``
by Hub name or folder, or ``open_clip:ARCH/PRETRAINED`` when ``open_clip`` is installed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lpd.files import atomic_write_bytes, state_dict_digest
from lpd.images import image_path, read_image

__all__ = ["CLIPScorer", "clip_score", "score_run"]

OPEN_CLIP = "open_clip:"


def _pooled(out: Any) -> Tensor:
    """Features of ``get_*_features``: a tensor, or (transformers 5) its ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPScorer:
    """A frozen CLIP model that embeds uint8 images ``[B, H, W, 3]`` and texts; ``record``: its name
    and weight digest."""

    def __init__(self, name: str, device: torch.device | str = "cpu") -> None:
        self.name, self.device = name, torch.device(device)
        if name.startswith(OPEN_CLIP):
            self._load_open_clip(name[len(OPEN_CLIP) :])
        else:
            from transformers import CLIPModel, CLIPProcessor

            try:
                self.processor = CLIPProcessor.from_pretrained(name)
                self.model = CLIPModel.from_pretrained(name, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"--clip_model {name!r} cannot be loaded ({e}); give a Hugging Face CLIP model "
                    f"name (in the Hub cache when offline) or a folder saved with save_pretrained"
                ) from e
        self.model.requires_grad_(False).eval().to(self.device)
        self.record = {"clip_model": name, "clip_sha256": state_dict_digest(self.model)}

    def _load_open_clip(self, spec: str) -> None:
        try:
            import open_clip
        except ImportError as e:
            raise FileNotFoundError(
                f"--clip_model {OPEN_CLIP}{spec} needs the open_clip package: pip install "
                f"open_clip_torch (or give a transformers CLIP model)"
            ) from e
        arch, _, pretrained = spec.partition("/")
        self.model, _, self._preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None
        )
        self._tokenize = open_clip.get_tokenizer(arch)
        self.processor = None

    @torch.no_grad()
    def cosines(self, images: np.ndarray, texts: Sequence[str]) -> Tensor:
        """Cosine similarity ``[B]`` (float32, CPU) of each image with its text."""
        if self.processor is None:  # open_clip
            from PIL import Image

            pix = torch.stack([self._preprocess(Image.fromarray(np.asarray(im))) for im in images])
            img = self.model.encode_image(pix.to(self.device))
            txt = self.model.encode_text(self._tokenize(list(texts)).to(self.device))
        else:
            limit = self.model.config.text_config.max_position_embeddings
            txt_in = self.processor.tokenizer(
                list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"
            )
            pix = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
            img = _pooled(self.model.get_image_features(pixel_values=pix.to(self.device)))
            txt = _pooled(self.model.get_text_features(**txt_in.to(self.device)))
        return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu()


def clip_score(
    scorer: CLIPScorer,
    images: np.ndarray | Sequence[str],
    prompts: Sequence[str],
    batch_size: int = 50,
) -> dict[str, Any]:
    """``clip_score_w100`` (mean of ``100 * max(cos, 0)``) and its standard deviation over the pairs
    (image ``i``, ``prompts[i]``); ``images``: uint8 ``[N, H, W, 3]`` or image paths."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for a in range(0, len(prompts), batch_size):
        batch = images[a : a + batch_size]
        batch = np.stack([np.asarray(read_image(p)) if isinstance(p, str) else p for p in batch])
        scores.append(100 * scorer.cosines(batch, prompts[a : a + batch_size]).clamp(min=0))
    s = torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)
    std = float(s.std(unbiased=False)) if len(s) else None
    return {
        "clip_score_w100": float(s.mean()) if len(s) else None,
        "clip_score_w100_std": std,
        **scorer.record,
    }


def score_run(
    record: dict[str, Any], scorer: CLIPScorer, texts: Sequence[str], batch_size: int = 50
) -> dict[str, Any]:
    """The record of an evaluation run folder with the CLIPScore of image ``i`` and ``texts[i]``,
    written to its ``metrics.json``."""
    paths = [image_path(record["files"]["images"], i) for i in range(len(texts))]
    record = {**record, **clip_score(scorer, paths, texts, batch_size)}
    data = json.dumps(record, indent=2, default=str).encode()
    atomic_write_bytes(record["files"]["metrics"], lambda f: f.write(data))
    return record
