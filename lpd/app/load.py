"""Loading the app's model: the embedded digits model (checked against its digest), a released
preset, an export folder or Hub repository, or a training checkpoint."""

from __future__ import annotations

import os

import torch

from lpd.app.model import AppModel, class_names
from lpd.files import CheckpointError, export_config, state_dict_digest
from lpd.hub import export_folder
from lpd.models import PRESETS
from lpd.pipeline import LPDPipeline, paper_settings

__all__ = ["EMBEDDED_DIR", "load_app_model"]

EMBEDDED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "app_digits"
)


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
