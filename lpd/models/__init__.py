"""LPD models: the presets, :func:`build_lpd` and :func:`load_lpd` (released or project checkpoints).

``load_lpd("lpd_l", img_size=256)``, ``load_lpd("lpd_l_256.pth", model="lpd_l")``, ``load_lpd("run/checkpoint-last.pth")``.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import torch

from lpd.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    CheckpointError,
    check_finite,
    export_folder,
    interpolate_pos_embed,
    load_checkpoint,
    load_into,
    read_export,
)
from lpd.models.lpd import (
    LPD,
    PRESETS,
    KVCache,
    LPDConfig,
    build_lpd,
    group_visible_mask,
    lpd_l,
    lpd_tiny,
    lpd_xl,
    lpd_xxl,
)

__all__ = [
    "LPD",
    "LPDConfig",
    "KVCache",
    "PRESETS",
    "build_lpd",
    "lpd_tiny",
    "lpd_l",
    "lpd_xl",
    "lpd_xxl",
    "load_lpd",
    "checkpoint_config",
    "group_visible_mask",
]


def checkpoint_config(
    ckpt: dict[str, Any], sd: dict[str, torch.Tensor], path: str, model: str | None = None
) -> LPDConfig:
    """A checkpoint's architecture: its ``model_config``, else the preset ``model`` or that of its released ``args``
    (grid, vocabulary and classes from the weights ``sd``)."""
    saved = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
    if saved is not None:
        cfg = LPDConfig(**saved)
        if model is not None:
            clash = {
                k: (getattr(cfg, k), v)
                for k, v in PRESETS.get(model, {}).items()
                if getattr(cfg, k) != v
            }
            if clash or model not in PRESETS:
                raise CheckpointError(
                    f"checkpoint {path!r} holds a model with {cfg.embed_dim} width, depth {cfg.depth}, "
                    f"{cfg.num_heads} heads, not the {model} preset; drop --model or pick the right checkpoint"
                )
        return cfg
    args = ckpt.get("args")
    name = model or (vars(args) if hasattr(args, "__dict__") else args or {}).get("model")
    if name not in PRESETS:
        raise CheckpointError(
            f"checkpoint {path!r} does not say which architecture it holds ({name!r}); "
            f"pass --model ({', '.join(sorted(PRESETS))}) and --img_size"
        )
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    return LPDConfig.from_name(
        name,
        grid * 16,
        vocab_size=sd["token_emb.weight"].shape[0],
        class_num=sd["class_emb.weight"].shape[0],
    )


def load_lpd(
    path_or_name: str | os.PathLike,
    model: str | None = None,
    img_size: int | None = None,
    map_location: Any = "cpu",
    interpolate: bool = False,
    overrides: dict[str, Any] | None = None,
    ema: bool = False,
) -> LPD:
    """Load a checkpoint file or folder, an export, or a preset's released checkpoint at ``img_size`` (default 256) strictly,
    in eval mode; a file's ``img_size`` must match unless ``interpolate``; non-finite weights are refused."""
    path = os.fspath(path_or_name)
    if path in PRESETS and not os.path.exists(path):
        from lpd import hub

        model, path = path, hub.resolve_checkpoint(path, img_size or 256)
    folder = export_folder(path)
    if folder is not None:
        config, weights = read_export(folder)
        if ema and config.get("weights") != "ema":
            raise CheckpointError(
                f"{path!r} holds the model's {config.get('weights')!r} weights, not an EMA; drop --use_ema"
            )
        ckpt, ema = {"model": weights, "model_config": config["model_config"]}, False
    else:
        ckpt = load_checkpoint(path, map_location)
    if ema and not isinstance(ckpt.get("model_ema"), dict):
        raise CheckpointError(
            f"checkpoint {path!r} holds no EMA weights (trained without --ema_decay); drop --use_ema"
        )
    key = "model_ema" if ema else "model"
    sd = ckpt[key] if isinstance(ckpt.get(key), dict) else ckpt
    if "pos_embed" not in sd:
        raise CheckpointError(
            f"checkpoint {path!r} has no 'pos_embed': it is not an LPD checkpoint"
        )
    try:
        cfg = checkpoint_config(ckpt, sd, path, model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: its model config cannot be built ({e})") from e
    cfg = replace(cfg, **(overrides or {}))
    if img_size is not None and img_size != cfg.img_size:
        if not interpolate:
            raise CheckpointError(
                f"checkpoint {path!r} was trained at {cfg.img_size} px ({cfg.grid_size}x{cfg.grid_size} tokens), "
                f"but img_size {img_size} was asked for; use --img_size {cfg.img_size} or the matching checkpoint"
            )
        cfg = replace(cfg, img_size=img_size)
        sd = {**sd, "pos_embed": interpolate_pos_embed(sd["pos_embed"], cfg.num_tokens)}
    check_finite(sd, f"checkpoint {path!r}")
    net = LPD(cfg)
    load_into(
        net,
        sd,
        source=f"checkpoint {path!r}",
        hint="is --model the architecture this file was trained with?"
        if folder is None
        else f"its {EXPORT_CONFIG} does not describe its {EXPORT_WEIGHTS}",
    )
    return net.eval()
