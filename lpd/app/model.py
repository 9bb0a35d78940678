"""The app's model: the embedded digits model (checked against its digest), a released preset or a
checkpoint, with its tokenizer, class names and default settings; decoding step by step for the
page."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpd.evaluate import image_seed
from lpd.files import CheckpointError, export_config, state_dict_digest
from lpd.hub import export_folder
from lpd.images import to_uint8
from lpd.models import PRESETS
from lpd.pipeline import LPDPipeline, paper_settings
from lpd.sampling import Decoder, SamplingConfig

__all__ = [
    "EMBEDDED_DIR",
    "AppModel",
    "load_app_model",
    "class_names",
    "decode_steps",
    "render_partial",
]

EMBEDDED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "app_digits"
)


@dataclass
class AppModel:
    """A model and its tokenizer as the page shows them; ``condition``: ``class`` or ``text``."""

    model: torch.nn.Module
    tokenizer: torch.nn.Module
    name: str
    class_names: list[str]
    condition: str = "class"
    cfg: float = 4.0  # defaults of the page; steps 20
    repulsion_threshold: float = 2.0
    bf16: bool = False
    text_encoder: Any = None  # a text model's recorded encoder

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def img_size(self) -> int:
        return int(self.model.config.img_size)

    @property
    def grid_size(self) -> int:
        return int(self.model.grid_size)

    @property
    def patch(self) -> int:
        return int(getattr(self.tokenizer, "downsample_factor", 16))

    def sampling(self, **changes) -> SamplingConfig:
        return SamplingConfig(
            cfg=self.cfg, repulsion_threshold=self.repulsion_threshold, bf16=self.bf16
        ).replace(**changes)


def class_names(class_num: int) -> list[str]:
    """Digits for 10 classes, ImageNet's (torchvision's list) for 1,000, else ``class k``."""
    if class_num == 10:
        return [str(d) for d in range(10)]
    if class_num == 1000:
        from torchvision.models import ResNet18_Weights

        return [
            f"{k}: {name}"
            for k, name in enumerate(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
        ]
    return [f"class {k}" for k in range(class_num)]


def _export(path: str, device: torch.device, vqgan_path: str | None) -> tuple[LPDPipeline, dict]:
    """An export folder or Hub repository as a pipeline, its weights checked by digest."""
    folder = export_folder(path)
    if folder is None:
        raise ValueError(
            f"--pretrained_ckpt {path}: not a checkpoint file, an export folder or a Hub repository"
        )
    pipe = LPDPipeline.from_pretrained(folder, vqgan_path=vqgan_path, device=device)
    if state_dict_digest(pipe.model) != export_config(folder).get("weights_sha256"):
        raise CheckpointError(
            f"the weights in {folder} do not match their recorded SHA-256 (damaged files?); "
            f"reinstall lpd or export them again (embedded: python -m lpd.app.embed --overwrite)"
        )
    return pipe, export_config(folder).get("sampling") or {}  # the page's defaults, if recorded


def load_app_model(
    model: str | None = None,
    img_size: int | None = None,
    pretrained_ckpt: str | None = None,
    vqgan_path: str | None = None,
    device: torch.device | str | None = None,
) -> AppModel:
    """The embedded digits model (no ``model`` or ``pretrained_ckpt``), a released ``model`` preset
    (Hub cache), or ``pretrained_ckpt``: an export folder, a Hub repository or a training checkpoint
    (with ``model``: a preset's file); ``img_size``: a preset's (256) or the checkpoint's own."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is not None and model not in PRESETS:
        raise ValueError(
            f"--model {model!r}: choose one of {sorted(PRESETS)} (or --pretrained_ckpt alone)"
        )
    path, defaults = pretrained_ckpt, {}
    if model is not None:
        pipe = LPDPipeline.from_pretrained(
            model, img_size, checkpoint=path, vqgan_path=vqgan_path, device=device
        )
    elif path is not None and os.path.isfile(path):  # a training checkpoint records its tokenizer
        pipe = LPDPipeline.from_pretrained(path, img_size, vqgan_path=vqgan_path, device=device)
    else:
        pipe, defaults = _export(path or EMBEDDED_DIR, device, vqgan_path)
    default_tr = defaults.get("repulsion_threshold", 2.0 if pipe.grid_size <= 16 else 4.0)
    tr, cfg = paper_settings(model, pipe.img_size, 20) or (default_tr, defaults.get("cfg", 4.0))
    name = model or (os.path.basename(os.path.normpath(path)) if path else "embedded digits model")
    text = pipe.model.config.condition == "text"
    return AppModel(
        pipe.model,
        pipe.tokenizer,
        name,
        [] if text else class_names(pipe.model.config.class_num),
        pipe.model.config.condition,
        float(cfg),
        float(tr),
        device.type == "cuda",
        pipe.text_encoder if text else None,
    )


def decode_steps(
    app: AppModel,
    label: int | tuple[torch.Tensor, torch.Tensor],
    order: np.ndarray,
    group_sizes: Sequence[int],
    sampling: SamplingConfig,
    seed: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(step, tokens [1, N])`` after each step: raster tokens, -1 where not decoded;
    ``label``: a class or a caption ``(features [1, L, C], mask [1, L])``.

    The draw is image 0 of a ``seed`` run, so the last step's tokens are ``LPDPipeline``'s (and
    ``sample_tokens``') for the same settings.
    """
    device, N = app.device, app.grid_size**2
    decoder = Decoder(app.model, sampling)
    orders = torch.as_tensor(order, device=device).long().view(1, N)
    if isinstance(label, tuple):
        prefix, mask = decoder.text_prefix(*(t.to(device) for t in label))
    else:
        prefix, mask = decoder.class_prefix(torch.tensor([label], device=device), 1), None
    gen = [torch.Generator().manual_seed(image_seed(seed, 0))]
    known = torch.full((1, N), -1, dtype=torch.long, device=device)
    steps = decoder.steps(prefix, orders, list(group_sizes), prefix_mask=mask, generator=gen)
    for k, step in enumerate(steps):
        known[0, orders[0, step.first : step.last]] = step.tokens[0, step.first : step.last]
        yield k, known.clone()


def render_partial(app: AppModel, tokens: torch.Tensor, grey: int = 128) -> np.ndarray:
    """uint8 ``[H, W, 3]`` preview of raster ``tokens [1, N]``, tokens -1 painted grey."""
    unknown = (tokens[0] < 0).cpu().numpy().reshape(app.grid_size, app.grid_size)
    amp = torch.autocast(app.device.type, dtype=torch.bfloat16, enabled=app.bf16)
    with torch.no_grad(), amp:
        pixels = to_uint8(
            app.tokenizer.decode(tokens.clamp(min=0).view(1, app.grid_size, app.grid_size))
        )[0]
    cover = np.kron(unknown, np.ones((app.patch, app.patch), dtype=bool))
    return np.where(cover[:, :, None], np.uint8(grey), pixels)
