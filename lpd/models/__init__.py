"""LPD models: the presets, :func:`build_lpd` and :func:`load_lpd` (released, trained, exported)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from lpd import files, hub
from lpd.files import CheckpointError
from lpd.models.lpd import LPD, PRESETS, LPDConfig, build_lpd, group_visible_mask

__all__ = ["LPD", "LPDConfig", "PRESETS", "build_lpd", "load_lpd", "read_weights", "fit_weights"]
__all__ += ["interpolate_pos_embed", "checkpoint_config", "group_visible_mask", *PRESETS]


def _preset(name: str) -> Callable[..., LPD]:
    def make(img_size: int = 256, **overrides: Any) -> LPD:
        return LPD(replace(LPDConfig.from_name(name, img_size), **overrides))

    make.__name__, make.__doc__ = name, f"The {name} preset at ``img_size``, with ``overrides``."
    return make


lpd_tiny, lpd_l, lpd_xl, lpd_xxl = (_preset(n) for n in PRESETS)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``pos_embed [1, 1 + n, D]`` resized to ``[1, 1 + num_tokens, D]`` (square grids, bicubic)."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, 1 + N, D], got {list(pos_embed.shape)}")
    old_n, D = pos_embed.shape[1] - 1, pos_embed.shape[2]
    old_g, new_g = math.isqrt(old_n), math.isqrt(num_tokens)
    if old_g * old_g != old_n or new_g * new_g != num_tokens:
        got = f"{old_n} -> {num_tokens} positions"
        raise ValueError(f"pos_embed interpolation needs square grids, got {got}")
    if old_n == num_tokens:
        return pos_embed
    grid = pos_embed[0, 1:].float().reshape(old_g, old_g, D).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(new_g, new_g), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(1, new_g * new_g, D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def checkpoint_config(ckpt: dict, sd: dict, path: str, model: str | None = None) -> LPDConfig:
    """A checkpoint's architecture: its ``model_config``, else the preset ``model`` or that of its
    released ``args`` (grid, vocabulary and classes from the weights ``sd``)."""
    if isinstance(saved := ckpt.get("model_config"), dict):
        cfg = LPDConfig(**saved)
        shape = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads")}
        if model is not None and shape != PRESETS.get(model):
            raise CheckpointError(
                f"checkpoint {path!r} holds a model with {cfg.embed_dim} width, depth "
                f"{cfg.depth}, {cfg.num_heads} heads, not the {model} preset; drop --model or "
                f"pick the right checkpoint"
            )
        return cfg
    args = ckpt.get("args")
    name = model or (vars(args) if hasattr(args, "__dict__") else args or {}).get("model")
    if name not in PRESETS:
        raise CheckpointError(
            f"checkpoint {path!r} does not say which architecture it holds ({name!r}); "
            f"pass --model ({', '.join(sorted(PRESETS))}) and --img_size"
        )
    vocab, classes = sd["token_emb.weight"].shape[0], sd["class_emb.weight"].shape[0]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    return LPDConfig.from_name(name, grid * 16, vocab_size=vocab, class_num=classes)


def read_weights(path: str, ema: bool = False, map_location: Any = "cpu") -> tuple[dict, dict]:
    """A checkpoint (file, sharded folder, export folder or Hub repository) and its model (or EMA)
    weights; an export gives ``{"model", "model_config", "export": its config.json}``."""
    if (folder := hub.export_folder(path)) is not None:
        config, weights = files.read_export(folder)
        if ema and (kind := config.get("weights")) != "ema":
            raise CheckpointError(
                f"{path!r} holds the model's {kind!r} weights, not an EMA; drop --use_ema"
            )
        return {"model": weights, "model_config": config["model_config"], "export": config}, weights
    ckpt = files.load_checkpoint(path, map_location)
    if ema and not isinstance(ckpt.get("model_ema"), dict):
        msg = f"checkpoint {path!r} holds no EMA weights (trained without --ema_decay)"
        raise CheckpointError(f"{msg}; drop --use_ema")
    key = "model_ema" if ema else "model"
    sd = ckpt[key] if isinstance(ckpt.get(key), dict) else ckpt
    if "pos_embed" not in sd:
        raise CheckpointError(f"checkpoint {path!r} has no 'pos_embed': not an LPD checkpoint")
    return ckpt, sd


def fit_weights(
    net: LPD, sd: dict, source: str, hint: str = "", log: Callable[[str], None] | None = None
) -> None:
    """``sd`` loaded into ``net`` strictly (finite weights only), ``pos_embed`` resized (logged)."""
    if (pe := sd["pos_embed"]).shape != net.pos_embed.shape:
        if log is not None:
            n = f"from {pe.shape[1] - 1} to {net.num_tokens} positions"
            log(f"{source}: pos_embed interpolated {n}")
        sd = {**sd, "pos_embed": interpolate_pos_embed(pe, net.num_tokens)}
    files.check_finite(sd, source)
    files.load_into(net, sd, source=source, hint=hint)


def load_lpd(
    path_or_name: str | os.PathLike,
    model: str | None = None,
    img_size: int | None = None,
    map_location: Any = "cpu",
    interpolate: bool = False,
    overrides: dict[str, Any] | None = None,
    ema: bool = False,
) -> LPD:
    """A checkpoint file or folder, an export, or a preset's released checkpoint at ``img_size``
    (default 256), loaded strictly in eval mode; ``interpolate``: to another ``img_size``."""
    path = os.fspath(path_or_name)
    if path in PRESETS and not os.path.exists(path):
        model, path = path, hub.resolve_checkpoint(path, img_size or 256)
    ckpt, sd = read_weights(path, ema, map_location)
    try:
        cfg = checkpoint_config(ckpt, sd, path, model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: its model config cannot be built ({e})") from e
    cfg = replace(cfg, **(overrides or {}))
    if img_size is not None and img_size != cfg.img_size:
        if not interpolate:
            raise CheckpointError(
                f"checkpoint {path!r} was trained at {cfg.img_size} px ({cfg.grid_size}x"
                f"{cfg.grid_size} tokens), but img_size {img_size} was asked for; use --img_size "
                f"{cfg.img_size} or the matching checkpoint"
            )
        cfg = replace(cfg, img_size=img_size)
    net = LPD(cfg)
    hint = "is --model the architecture this file was trained with?"
    if ckpt.get("export"):
        hint = f"its {files.EXPORT_CONFIG} does not describe its {files.EXPORT_WEIGHTS}"
    fit_weights(net, sd, f"checkpoint {path!r}", hint)
    return net.eval()
