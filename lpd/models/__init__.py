"""LPD models: :func:`build_lpd`, the named presets and loading of released / project checkpoints.

>>> from lpd.models import lpd_l, load_lpd
>>> model = load_lpd("lpd_l_256.pth", model="lpd_l")          # a released checkpoint
>>> model = load_lpd("outputs/run/checkpoint-last.pth")        # one of ours carries its config

Presets (spec section 1): L = width 1024, depth 24, 16 heads; XL = 1280, 36, 20; XXL = 1536, 48,
24; ``lpd_tiny`` (width 64, depth 2, 4 heads) is for smoke tests on a CPU.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

from lpd.checkpoint import CheckpointError, interpolate_pos_embed, load_checkpoint, load_into
from lpd.models.lpd import LPD, KVCache, LPDConfig, group_visible_mask

__all__ = [
    "LPD",
    "LPDConfig",
    "KVCache",
    "build_lpd",
    "lpd_l",
    "lpd_xl",
    "lpd_xxl",
    "lpd_tiny",
    "LPD_MODELS",
    "PRESETS",
    "create_model",
    "load_lpd",
    "group_visible_mask",
]

PRESETS: dict[str, dict[str, Any]] = {
    "lpd_tiny": dict(embed_dim=64, depth=2, num_heads=4),
    "lpd_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "lpd_xl": dict(embed_dim=1280, depth=36, num_heads=20),
    "lpd_xxl": dict(embed_dim=1536, depth=48, num_heads=24),
}


def build_lpd(
    img_size: int,
    vqgan_stride: int = 16,
    embed_dim: int = 1024,
    depth: int = 24,
    num_heads: int = 16,
    mlp_ratio: float = 4.0,
    vocab_size: int = 16384,
    class_num: int = 1000,
    layernorm_eps: float = 1e-6,
    attn_dropout: float = 0.1,
    proj_dropout: float = 0.1,
    label_drop_prob: float = 0.1,
    grad_checkpointing: bool = False,
) -> LPD:
    """Build an LPD transformer of any size (``img_size`` a multiple of ``vqgan_stride``)."""
    return LPD(
        LPDConfig(
            img_size=img_size,
            vqgan_stride=vqgan_stride,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            vocab_size=vocab_size,
            class_num=class_num,
            layernorm_eps=layernorm_eps,
            attn_dropout=attn_dropout,
            proj_dropout=proj_dropout,
            label_drop_prob=label_drop_prob,
            grad_checkpointing=grad_checkpointing,
        )
    )


def _preset(name: str) -> Callable[..., LPD]:
    def make(img_size: int = 256, **options: Any) -> LPD:
        return build_lpd(img_size=img_size, **{**PRESETS[name], **options})

    make.__name__ = name
    make.__doc__ = f"The {name} preset ({PRESETS[name]}) at ``img_size`` (any multiple of 16); options override."
    return make


lpd_tiny = _preset("lpd_tiny")
lpd_l = _preset("lpd_l")
lpd_xl = _preset("lpd_xl")
lpd_xxl = _preset("lpd_xxl")
LPD_MODELS: dict[str, Callable[..., LPD]] = {"lpd_tiny": lpd_tiny, "lpd_l": lpd_l, "lpd_xl": lpd_xl, "lpd_xxl": lpd_xxl}


def model_config(name: str | None, img_size: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`build_lpd` for a preset name (or ``None`` with full overrides)."""
    if name is not None and name not in PRESETS and not overrides:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)} or give a model_config")
    cfg: dict[str, Any] = dict(PRESETS.get(name, {})) if name else {}
    cfg.update(overrides or {})
    cfg["img_size"] = img_size
    return cfg


def create_model(name: str | None, img_size: int, overrides: dict[str, Any] | None = None) -> LPD:
    """A model from a preset name and/or a ``model_config`` dict."""
    return build_lpd(**model_config(name, img_size, overrides))


def _args_get(args: Any, key: str) -> Any:
    if isinstance(args, argparse.Namespace):
        return getattr(args, key, None)
    if isinstance(args, dict):
        return args.get(key)
    return None


def load_lpd(
    path: str | os.PathLike,
    model: str | None = None,
    img_size: int | None = None,
    map_location: Any = "cpu",
    interpolate: bool = False,
    overrides: dict[str, Any] | None = None,
) -> LPD:
    """Load an LPD checkpoint strictly and return the model (in eval mode).

    The architecture comes from, in order: the checkpoint's own ``'model_config'`` (written by
    this project), the preset ``model`` (released checkpoints: ``lpd_l`` etc.), or the
    ``'args'`` the released training code stored.  ``img_size`` must match the checkpoint's
    token grid unless ``interpolate=True`` (``pos_embed`` is then resized bicubically, slot 0 kept).
    """
    ckpt = load_checkpoint(path, map_location)
    sd = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else ckpt
    if "pos_embed" not in sd:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} has no 'pos_embed': it is not an LPD checkpoint")
    ckpt_tokens = sd["pos_embed"].shape[1] - 1
    ckpt_cfg = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
    stride = int((ckpt_cfg or {}).get("vqgan_stride", 16))
    grid = math.isqrt(ckpt_tokens)
    ckpt_img = grid * stride
    if ckpt_cfg is not None:
        cfg = dict(ckpt_cfg)
        if model is not None and model in PRESETS:
            for k, v in PRESETS[model].items():
                if cfg.get(k) != v:
                    raise CheckpointError(
                        f"checkpoint {os.fspath(path)!r} holds a model with {k}={cfg.get(k)}, not the "
                        f"{model} preset ({k}={v}); drop --model or pick the right checkpoint"
                    )
    else:
        name = model or _args_get(ckpt.get("args"), "model")
        if name is None:
            raise CheckpointError(
                f"checkpoint {os.fspath(path)!r} does not say which architecture it holds; pass the "
                f"model name (--model lpd_l / lpd_xl / lpd_xxl) and --img_size"
            )
        if name not in PRESETS:
            raise CheckpointError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
        cfg = dict(PRESETS[name])
        # The vocabulary / class count of the released models follow from the weights.
        cfg["vocab_size"] = sd["token_emb.weight"].shape[0] if "token_emb.weight" in sd else 16384
        cfg["class_num"] = sd["class_emb.weight"].shape[0] if "class_emb.weight" in sd else 1000
    cfg.update(overrides or {})
    target_img = img_size if img_size is not None else ckpt_img
    if target_img != ckpt_img:
        if not interpolate:
            raise CheckpointError(
                f"checkpoint {os.fspath(path)!r} was trained at {ckpt_img} px ({grid}x{grid} tokens), "
                f"but img_size {target_img} was asked for; use --img_size {ckpt_img}, the matching "
                f"checkpoint, or position-embedding interpolation (fine-tuning from a 256 px model)"
            )
        sd = dict(sd)
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], (target_img // stride) ** 2)
    cfg["img_size"] = target_img
    net = build_lpd(**cfg)
    load_into(net, sd, source=f"checkpoint {os.fspath(path)!r}", hint="is --model the architecture this file was trained with?")
    return net.eval()
