"""LPD models: the presets, :func:`build_lpd` and :func:`load_lpd` (released or project checkpoints).

>>> model = load_lpd("lpd_l", img_size=256)                     # the released checkpoint, from the Hub cache
>>> model = load_lpd("lpd_l_256.pth", model="lpd_l")             # a released file
>>> model = load_lpd("outputs/run/checkpoint-last.pth")          # ours carry their config
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import torch

from lpd.checkpoint import CheckpointError, check_finite, interpolate_pos_embed, load_checkpoint, load_into
from lpd.models.lpd import LPD, PRESETS, KVCache, LPDConfig, build_lpd, group_visible_mask, lpd_l, lpd_tiny, lpd_xl, lpd_xxl

__all__ = ["LPD", "LPDConfig", "KVCache", "PRESETS", "build_lpd", "lpd_tiny", "lpd_l", "lpd_xl", "lpd_xxl",
           "load_lpd", "group_visible_mask"]


def load_lpd(path_or_name: str | os.PathLike, model: str | None = None, img_size: int | None = None,
             map_location: Any = "cpu", interpolate: bool = False, overrides: dict[str, Any] | None = None) -> LPD:
    """Load an LPD checkpoint strictly, in eval mode.

    ``path_or_name``: a checkpoint file, or a preset name (``lpd_l`` ...) whose released checkpoint
    at ``img_size`` (default 256) is resolved through the Hugging Face cache. The architecture
    comes from the checkpoint's ``model_config`` (ours), else the preset ``model`` (released
    files), else the released training ``args``. ``img_size`` must match the checkpoint unless
    ``interpolate`` (``pos_embed`` resized bicubically, slot 0 kept). Non-finite weights are refused.
    """
    path = os.fspath(path_or_name)
    if path in PRESETS and not os.path.exists(path):
        from lpd import hub

        model, path = path, hub.resolve_checkpoint(path, img_size or 256)
    ckpt = load_checkpoint(path, map_location)
    sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    if "pos_embed" not in sd:
        raise CheckpointError(f"checkpoint {path!r} has no 'pos_embed': it is not an LPD checkpoint")
    saved = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
    if saved is not None:
        cfg = LPDConfig(**saved)
        if model is not None:
            clash = {k: (getattr(cfg, k), v) for k, v in PRESETS.get(model, {}).items() if getattr(cfg, k) != v}
            if clash or model not in PRESETS:
                raise CheckpointError(f"checkpoint {path!r} holds a model with {cfg.embed_dim} width, depth {cfg.depth}, "
                                      f"{cfg.num_heads} heads, not the {model} preset; drop --model or pick the right checkpoint")
    else:
        args = ckpt.get("args")
        name = model or (vars(args) if hasattr(args, "__dict__") else args or {}).get("model")
        if name not in PRESETS:
            raise CheckpointError(f"checkpoint {path!r} does not say which architecture it holds ({name!r}); "
                                  f"pass --model ({', '.join(sorted(PRESETS))}) and --img_size")
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        cfg = LPDConfig.from_name(name, grid * 16, vocab_size=sd["token_emb.weight"].shape[0], class_num=sd["class_emb.weight"].shape[0])
    cfg = replace(cfg, **(overrides or {}))
    if img_size is not None and img_size != cfg.img_size:
        if not interpolate:
            raise CheckpointError(f"checkpoint {path!r} was trained at {cfg.img_size} px ({cfg.grid_size}x{cfg.grid_size} tokens), "
                                  f"but img_size {img_size} was asked for; use --img_size {cfg.img_size} or the matching checkpoint")
        cfg = replace(cfg, img_size=img_size)
        sd = {**sd, "pos_embed": interpolate_pos_embed(sd["pos_embed"], cfg.num_tokens)}
    check_finite(sd, f"checkpoint {path!r}")
    net = LPD(cfg)
    load_into(net, sd, source=f"checkpoint {path!r}", hint="is --model the architecture this file was trained with?")
    return net.eval()
