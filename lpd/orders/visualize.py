"""Pictures of generation orders (Pillow only): the grid coloured by step, then the first steps one by one."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lpd.orders.files import check_order_rows
from lpd.schedules import validate_group_sizes

__all__ = ["render_order", "step_colours"]

# Anchor colours of a dark-blue -> teal -> green -> yellow ramp (perceptually ordered).
_RAMP = np.array([(48, 18, 59), (65, 69, 171), (57, 120, 220), (29, 170, 190), (40, 204, 130), (140, 220, 60),
                  (220, 210, 45), (250, 170, 40)], dtype=np.float64)
_BACKGROUND, _EARLIER, _CURRENT, _FUTURE, _LINE, _TEXT = (
    (255, 255, 255), (170, 170, 170), (235, 100, 20), (246, 246, 246), (215, 215, 215), (30, 30, 30))


def step_colours(num_steps: int) -> list[tuple[int, int, int]]:
    """One RGB colour per step, from dark blue (step 0) to yellow (last step)."""
    t = np.linspace(0.0, 1.0, max(num_steps, 1))
    x = t * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[:, None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    return [tuple(int(round(c)) for c in row) for row in rgb]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _text_centre(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill) -> None:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (r - l) / 2 - l, xy[1] - (b - t) / 2 - t), text, font=font, fill=fill)


def render_order(order: Sequence[int], group_sizes: Sequence[int], grid_size: int, steps_shown: int = 6,
                 cell: int | None = None, kinds: Sequence[int] | None = None, title: str | None = None) -> Image.Image:
    """An RGB image of ``order`` (raster indices in generation order) split by ``group_sizes``.

    Cells show their decoding step; ``steps_shown`` early steps get a panel each (grey: decoded before,
    orange: this step); ``cell`` is the cell size in pixels; fallback picks (``kinds`` >= 2) are marked.
    """
    n = grid_size * grid_size
    order = check_order_rows(np.asarray(order)[None], 1, grid_size, "order")[0]
    sizes = validate_group_sizes(group_sizes, n)
    k_steps = len(sizes)
    step_of_slot = np.repeat(np.arange(k_steps), sizes)
    step_at = np.empty(n, dtype=np.int64)
    step_at[order] = step_of_slot
    fallback = np.zeros(n, dtype=bool)
    if kinds is not None:
        fallback[order] = np.asarray(kinds) >= 2
    cell = cell or max(8, min(40, 512 // grid_size))
    small = max(4, min(16, 160 // grid_size))
    steps_shown = max(0, min(steps_shown, k_steps))
    colours = step_colours(k_steps)

    pad, legend_w, head = 16, 70, 28
    grid_px = cell * grid_size
    panel_px = small * grid_size
    per_row = max(1, (grid_px + legend_w) // (panel_px + pad))
    panel_rows = -(-steps_shown // per_row) if steps_shown else 0
    width = pad + grid_px + pad + legend_w + pad
    height = pad + head + grid_px + pad + panel_rows * (head + panel_px + pad)
    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    f_title, f_cell, f_small = _font(16), _font(max(8, int(cell * 0.45))), _font(12)

    caption = title or f"{grid_size}x{grid_size} tokens, {k_steps} steps: decoding step per position"
    draw.text((pad, pad), caption, font=f_title, fill=_TEXT)
    x0, y0 = pad, pad + head
    for p in range(n):
        r, c = divmod(p, grid_size)
        s = int(step_at[p])
        box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1)
        draw.rectangle(box, fill=colours[s])
        if cell >= 14:
            lum = 0.299 * colours[s][0] + 0.587 * colours[s][1] + 0.114 * colours[s][2]
            _text_centre(draw, ((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2), str(s), f_cell,
                         (0, 0, 0) if lum > 140 else (255, 255, 255))
        if fallback[p] and cell < 14:
            q = max(1, cell // 6)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=(255, 255, 255))
        elif fallback[p]:
            draw.rectangle(box, outline=(255, 255, 255))

    # Legend: a colour bar with step numbers.
    lx = x0 + grid_px + pad
    bar_w = 16
    draw.text((lx, y0 - 18), "step", font=f_small, fill=_TEXT)
    for s in range(k_steps):
        top = y0 + int(round(s * grid_px / k_steps))
        bot = y0 + int(round((s + 1) * grid_px / k_steps)) - 1
        draw.rectangle((lx, top, lx + bar_w, max(top, bot)), fill=colours[s])
    ticks = sorted({0, k_steps - 1} | set(range(0, k_steps, max(1, -(-k_steps // 10)))))
    for s in ticks:
        ty = y0 + (s + 0.5) * grid_px / k_steps
        draw.line((lx + bar_w, ty, lx + bar_w + 4, ty), fill=_TEXT)
        draw.text((lx + bar_w + 7, ty - 7), str(s), font=f_small, fill=_TEXT)
    if fallback.any():
        marker = "outlined" if cell >= 14 else "dot"
        draw.text((lx, y0 + grid_px + 2), f"{marker}:\nfallback\npick", font=_font(10), fill=_TEXT)

    # The first steps one by one: grey = decoded before, orange = this step, light = later.
    for i in range(steps_shown):
        pr, pc = divmod(i, per_row)
        px = pad + pc * (panel_px + pad)
        py = y0 + grid_px + pad + pr * (head + panel_px + pad)
        draw.text((px, py + 4), f"step {i}: +{sizes[i]}", font=f_small, fill=_TEXT)
        gy = py + head
        for p in range(n):
            r, c = divmod(p, grid_size)
            s = int(step_at[p])
            fill = _EARLIER if s < i else _CURRENT if s == i else _FUTURE
            box = (px + c * small, gy + r * small, px + (c + 1) * small - 1, gy + (r + 1) * small - 1)
            draw.rectangle(box, fill=fill, outline=_LINE if s > i else None)
    return img
