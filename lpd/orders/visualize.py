"""Pictures of generation orders (Pillow only): the grid coloured by step, then the first steps one by one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lpd.orders.files import check_order_rows
from lpd.schedules import validate_group_sizes

# Anchor colours (hex RGB) of a dark-blue -> teal -> green -> yellow ramp (perceptually ordered).
_HEX = "30123b 4145ab 3978dc 1daabe 28cc82 8cdc3c dcd22d faaa28"
_RAMP = np.array([list(bytes.fromhex(h)) for h in _HEX.split()], np.float64)
_BACKGROUND, _EARLIER, _CURRENT = (255, 255, 255), (170, 170, 170), (235, 100, 20)
_FUTURE, _LINE, _TEXT = (246, 246, 246), (215, 215, 215), (30, 30, 30)


def step_colours(num_steps: int) -> list[tuple[int, int, int]]:
    """One RGB colour per step, from dark blue (step 0) to yellow (last step)."""
    x = np.linspace(0.0, 1.0, max(num_steps, 1)) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    f = (x - i)[:, None]
    return [tuple(int(round(c)) for c in row) for row in _RAMP[i] * (1 - f) + _RAMP[i + 1] * f]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _cells(x: int, y: int, size: int, grid_size: int):  # (position, box) of every cell
    for p in range(grid_size * grid_size):
        r, c = divmod(p, grid_size)
        yield p, (x + c * size, y + r * size, x + (c + 1) * size - 1, y + (r + 1) * size - 1)


def render_order(
    order: Sequence[int],
    group_sizes: Sequence[int],
    grid_size: int,
    steps_shown: int = 6,
    cell: int | None = None,
    kinds: Sequence[int] | None = None,
    title: str | None = None,
) -> Image.Image:
    """An RGB image of ``order`` (raster indices in generation order) split by ``group_sizes``.

    Cells show their decoding step; ``steps_shown`` early steps get a panel each (grey: decoded before,
    orange: this step); ``cell`` is the cell size in pixels; fallback picks (``kinds`` >= 2) are marked.
    """
    n = grid_size * grid_size
    order = check_order_rows(np.asarray(order)[None], 1, grid_size, "order")[0]
    sizes = validate_group_sizes(group_sizes, n)
    k_steps, slot = len(sizes), np.argsort(order)  # slot: position -> index in the order
    step_at = np.repeat(np.arange(k_steps), sizes)[slot]
    fallback = np.zeros(n, dtype=bool) if kinds is None else (np.asarray(kinds) >= 2)[slot]
    cell = cell or max(8, min(40, 512 // grid_size))
    small = max(4, min(16, 160 // grid_size))
    steps_shown = max(0, min(steps_shown, k_steps))
    colours = step_colours(k_steps)
    pad, legend_w, head = 16, 70, 28
    grid_px, panel_px = cell * grid_size, small * grid_size
    per_row = max(1, (grid_px + legend_w) // (panel_px + pad))
    height = pad + head + grid_px + pad + -(-steps_shown // per_row) * (head + panel_px + pad)
    img = Image.new("RGB", (pad + grid_px + pad + legend_w + pad, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    f_title, f_cell, f_small = _font(16), _font(max(8, int(cell * 0.45))), _font(12)
    caption = f"{grid_size}x{grid_size} tokens, {k_steps} steps: decoding step per position"
    draw.text((pad, pad), title or caption, font=f_title, fill=_TEXT)
    x0, y0 = pad, pad + head
    for p, box in _cells(x0, y0, cell, grid_size):
        s = int(step_at[p])
        draw.rectangle(box, fill=colours[s])
        if cell >= 14:
            lum = 0.299 * colours[s][0] + 0.587 * colours[s][1] + 0.114 * colours[s][2]
            l, t, r, b = draw.textbbox((0, 0), str(s), font=f_cell)  # centred in the cell
            at = ((box[0] + box[2] + 1 - r - l) / 2, (box[1] + box[3] + 1 - b - t) / 2)
            ink = (0, 0, 0) if lum > 140 else (255, 255, 255)
            draw.text(at, str(s), font=f_cell, fill=ink)
        if fallback[p] and cell < 14:
            q = max(1, cell // 6)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=(255, 255, 255))
        elif fallback[p]:
            draw.rectangle(box, outline=(255, 255, 255))
    lx, bar_w = x0 + grid_px + pad, 16  # legend: a colour bar with step numbers
    draw.text((lx, y0 - 18), "step", font=f_small, fill=_TEXT)
    edges = [y0 + int(round(s * grid_px / k_steps)) for s in range(k_steps + 1)]
    for s in range(k_steps):
        draw.rectangle((lx, edges[s], lx + bar_w, max(edges[s], edges[s + 1] - 1)), fill=colours[s])
    for s in sorted({0, k_steps - 1} | set(range(0, k_steps, max(1, -(-k_steps // 10))))):
        ty = y0 + (s + 0.5) * grid_px / k_steps
        draw.line((lx + bar_w, ty, lx + bar_w + 4, ty), fill=_TEXT)
        draw.text((lx + bar_w + 7, ty - 7), str(s), font=f_small, fill=_TEXT)
    if fallback.any():
        marker = "outlined" if cell >= 14 else "dot"
        draw.text((lx, y0 + grid_px + 2), f"{marker}:\nfallback\npick", font=_font(10), fill=_TEXT)
    for i in range(steps_shown):  # the first steps one by one
        pr, pc = divmod(i, per_row)
        px, py = pad + pc * (panel_px + pad), y0 + grid_px + pad + pr * (head + panel_px + pad)
        draw.text((px, py + 4), f"step {i}: +{sizes[i]}", font=f_small, fill=_TEXT)
        for p, box in _cells(px, py + head, small, grid_size):
            s = int(step_at[p])
            fill = _EARLIER if s < i else _CURRENT if s == i else _FUTURE
            draw.rectangle(box, fill=fill, outline=_LINE if s > i else None)
    return img
