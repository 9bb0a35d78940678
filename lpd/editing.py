"""Zero-shot editing with any LPD checkpoint: inpainting, outpainting and class-conditional editing.
The known tokens are prefilled into the KV cache, then only the unknown ones are decoded."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lpd.config import check_labels
from lpd.images import image_to_tensor, load_image, load_mask
from lpd.orders.generate import lpd_orders, random_orders
from lpd.sampling import Decoder, SamplingConfig, decode_tokens
from lpd.schedules import group_sizes as schedule_for
from lpd.schedules import scaled_group_sizes, validate_group_sizes

__all__ = ["edit_tokens", "edit_images", "region_mask", "token_keep"]

PREFILL_LAYOUTS = ("one", "schedule")
_REGION = re.compile(r"(left|right|top|bottom|center|box:.*|border:.*)")


def region_mask(region: str, img_size: int) -> np.ndarray:
    """Pixel mask (True: regenerate) of ``box:x0,y0,x1,y1``, a half (``left`` ...), ``center``
    (the middle half of each side) or ``border:PX``."""
    s, m = img_size, np.zeros((img_size, img_size), dtype=bool)
    h, q, whole = s // 2, s // 4, slice(None)
    fixed = dict(left=(whole, slice(0, h)), right=(whole, slice(h, s)), top=(slice(0, h), whole))
    fixed |= dict(bottom=(slice(h, s), whole), center=(slice(q, s - q),) * 2)
    if region in fixed:
        m[fixed[region]] = True
        return m
    box = re.fullmatch(r"box:(\d+),(\d+),(\d+),(\d+)", region)
    border = re.fullmatch(r"border:(\d+)", region)
    if box:
        x0, y0, x1, y1 = map(int, box.groups())
        if not (0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s):
            raise ValueError(
                f"--region {region}: the box must satisfy 0 <= x0 < x1 <= {s} and 0 <= y0 < y1 <= {s}"
            )
        m[y0:y1, x0:x1] = True
    elif border:
        px = int(border.group(1))
        if not 0 < px < s // 2:
            raise ValueError(
                f"--region {region}: the border must be between 1 and {s // 2 - 1} pixels"
            )
        m[:] = True
        m[px : s - px, px : s - px] = False
    else:
        raise ValueError(
            f"--region {region!r}: use box:x0,y0,x1,y1, left, right, top, bottom, center or border:PX"
        )
    return m


def token_keep(mask: np.ndarray, patch: int = 16) -> np.ndarray:
    """Known tokens ``[N]`` (raster) of a pixel mask: a patch touching the mask is regenerated."""
    h, w = mask.shape
    if h % patch or w % patch:
        raise ValueError(f"mask of {h}x{w} pixels is not a whole number of {patch}x{patch} patches")
    return ~mask.reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3)).reshape(-1)


def prefill_layout(
    layout: str, m: int, img_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, list[int]]:
    """Order and group sizes of ``m`` known tokens: ``one`` group, or ``schedule``: a random order
    in the first ``m`` tokens of the released 20-step schedule (as in training)."""
    if layout == "one":
        return torch.arange(m), [m]
    if layout != "schedule":
        raise ValueError(f"prefill layout must be one of {PREFILL_LAYOUTS}, got {layout!r}")
    table = schedule_for(img_size, min(20, (img_size // 16) ** 2))
    sizes = np.diff(np.minimum(np.cumsum(table), m), prepend=0)
    return torch.randperm(m, generator=generator), sizes[sizes > 0].tolist()


def _orders(keep: np.ndarray, sizes: list[int], grid: int, sampling, seed: int) -> np.ndarray:
    """Unknown positions of each row of ``keep [B, N]`` in decoding order."""
    idx, kind = np.arange(len(keep)), sampling.order
    if kind == "lpd":
        tp, tr = sampling.proximity_threshold, sampling.repulsion_threshold
        return lpd_orders(len(keep), sizes, grid, tp, tr, seed=seed, indices=idx, known=keep)
    if kind == "random":
        return random_orders(len(keep), grid, seed=seed, indices=idx, known=keep)
    return np.stack([np.flatnonzero(~k) for k in keep])  # raster


def _prepare(model: torch.nn.Module, tokens: Any, keep: Any, labels: Any) -> tuple:
    """``tokens`` (int64 on the model's device), ``keep`` and ``labels``, checked."""
    device, N = model.pos_embed.device, model.num_tokens
    tokens = torch.as_tensor(tokens if torch.is_tensor(tokens) else np.asarray(tokens)).to(device)
    keep = np.asarray(keep.cpu() if torch.is_tensor(keep) else keep)
    if tokens.dim() != 2 or tokens.shape[1] != N or tokens.is_floating_point():
        raise ValueError(
            f"tokens must be integers [B, {N}] (raster order), got {tokens.dtype} {list(tokens.shape)}"
        )
    if keep.dtype != bool or keep.shape != tuple(tokens.shape):
        raise ValueError(
            f"keep must be a bool mask of the tokens' shape {list(tokens.shape)}, got {keep.dtype} "
            f"{list(keep.shape)}"
        )
    if isinstance(labels, tuple):  # caption features [B, L, C] and mask [B, L] of a text model
        if len(labels) != 2 or any(len(t) != len(tokens) for t in labels):
            raise ValueError(f"a text condition is (features, mask) of {len(tokens)} captions")
        return tokens.long(), keep, tuple(t.to(device) for t in labels)
    if labels is not None:
        labels = check_labels(labels, len(tokens), model.class_num, "labels (--label)")
        labels = torch.as_tensor(labels, device=device)
    return tokens.long(), keep, labels


def _known(model: Any, keep: np.ndarray, layout: str, generator: Any) -> tuple[torch.Tensor, list]:
    """Known positions ``[B, M]`` of ``keep`` in prefill order and their group sizes."""
    device = model.pos_embed.device
    known = torch.as_tensor(np.stack([np.flatnonzero(k) for k in keep]), device=device)
    perm, sizes = prefill_layout(layout, known.shape[1], model.config.img_size, generator)
    return known[:, perm.to(device)], [s for s in sizes if s]


def edit_tokens(
    model: torch.nn.Module,
    tokens: Any,
    keep: Any,
    labels: Any = None,
    *,
    steps: int | None = None,
    group_sizes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    sampling: SamplingConfig | None = None,
    prefill: str = "one",
    greedy: bool = False,
) -> torch.Tensor:
    """Raster ``tokens [B, N]`` with those not in ``keep`` (True: kept) regenerated as ``labels``
    (None: unconditional; text: ``(features, mask)``) in ``steps`` (scaled released table) or
    ``group_sizes``, in ``sampling.order``; ``prefill``: :func:`prefill_layout`."""
    sampling = sampling or SamplingConfig()
    tokens, keep, labels = _prepare(model, tokens, keep, labels)
    if labels is None and sampling.cfg != 1.0:
        raise ValueError(
            "classifier-free guidance needs labels; use cfg=1.0 for unconditional editing"
        )
    if prefill not in PREFILL_LAYOUTS:
        raise ValueError(f"prefill layout must be one of {PREFILL_LAYOUTS}, got {prefill!r}")
    out, decoder = tokens.clone(), Decoder(model, sampling, greedy=greedy)
    n_unknown = (~keep).sum(1)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    for n in sorted(set(n_unknown.tolist()) - {0}):  # images of as many unknown tokens together
        rows = np.flatnonzero(n_unknown == n)
        if group_sizes is not None:
            sizes = validate_group_sizes(group_sizes, n)
        else:
            if steps is None or isinstance(steps, bool) or not 1 <= steps <= n:
                raise ValueError(
                    f"--steps must be an integer between 1 and the {n} tokens to regenerate, "
                    f"got {steps!r}"
                )
            sizes = scaled_group_sizes(n, steps, model.config.img_size)
        orders = _orders(keep[rows], sizes, model.grid_size, sampling, seed + int(rows[0]))
        orders = torch.as_tensor(orders, device=tokens.device)
        sub = tokens[rows]
        known, known_sizes = _known(model, keep[rows], prefill, generator)  # they come first
        given = torch.gather(sub, 1, known) if known_sizes else None
        if isinstance(labels, tuple):
            prefix, prefix_mask = decoder.text_prefix(*(t[rows] for t in labels))
        else:
            lab = None if labels is None else labels[rows]
            prefix, prefix_mask = decoder.class_prefix(lab, len(rows)), None
        full, options = torch.cat([known, orders], 1), dict(known=given, generator=generator)
        gen = decoder.decode(prefix, full, known_sizes + sizes, prefix_mask=prefix_mask, **options)
        out[rows] = sub.scatter(1, orders, gen)
    return out


def edit_images(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    image: Any,
    mask: Any,
    label: int | tuple | None,
    *,
    num: int = 1,
    steps: int = 12,
    seed: int = 0,
    paste: bool = False,
    **options: Any,
) -> dict[str, np.ndarray]:
    """uint8 ``source``, ``masked`` and ``edits [num, H, W, 3]`` of one image under ``mask`` (white,
    or a :func:`region_mask`); ``paste``: source pixels outside; ``options``: of edit_tokens."""
    size = model.config.img_size
    source = load_image(image, size)
    is_region = isinstance(mask, str) and _REGION.fullmatch(mask)
    pixels = region_mask(mask, size) if is_region else load_mask(mask, size, image=image)
    keep = token_keep(pixels, int(getattr(tokenizer, "downsample_factor", 16)))
    with torch.no_grad():
        tokens = tokenizer.encode(image_to_tensor(source).to(model.pos_embed.device)).reshape(1, -1)
    sampling = options.setdefault("sampling", None) or SamplingConfig()
    keep = np.broadcast_to(keep, (num, keep.size)).copy()
    labels = None if label is None else [label] * num
    if isinstance(label, tuple):  # a caption (features [1, L, C], mask [1, L])
        labels = tuple(t.expand(num, *t.shape[1:]) for t in label)
    options.update(steps=steps, generator=torch.Generator().manual_seed(seed))
    edited = edit_tokens(model, tokens.expand(num, -1), keep, labels, **options)
    edits = decode_tokens(tokenizer, edited, sampling)  # as an evaluation: fixed chunks, bf16
    if paste:
        edits = np.where(pixels[None, :, :, None], edits, source[None])
    masked = np.where(pixels[:, :, None], (source * 0.3 + 90).astype(np.uint8), source)
    return {"source": source, "masked": masked, "edits": edits}


def editing_logits(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    keep: np.ndarray,
    labels: torch.Tensor | None,
    orders: torch.Tensor,
    group_sizes: Sequence[int],
    prefill: str = "one",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Head outputs of editing fed the true unknown tokens (teacher forcing), ``[B, n, V]`` in decoding order."""
    tokens, keep, labels = _prepare(model, tokens, keep, labels)
    known, known_sizes = _known(model, keep, prefill, generator)
    orders = torch.cat([known, torch.as_tensor(orders, device=tokens.device)], 1)
    decoder, sizes = Decoder(model), known_sizes + list(group_sizes)
    prefix, given = decoder.class_prefix(labels, len(tokens)), torch.gather(tokens, 1, orders)
    return decoder.logits(prefix, orders, sizes, given, n_known=known.shape[1])
