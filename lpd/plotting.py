"""Small PNG charts drawn with Pillow (no plotting dependency): line charts with a legend.

Used for results people would rather see than read: the demo's ablation curves and the speed
benchmarks' latency / throughput curves.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["line_chart", "save_png_atomic", "PALETTE"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG through a temporary file and a rename (never a half-written file)."""
    from lpd.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool,
    font: ImageFont.ImageFont,
    colors: Mapping[str, tuple[int, int, int]],
) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 28, y1 - 40
    draw.text((x0 + (x1 - x0) // 2 - 3 * len(title), y0 + 6), title, fill="black", font=font)
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill="gray", font=font)
        return
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs = [fx(x) for x, _ in pts]
    ys = [y for _, y in pts]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1
    pad = (ymax - ymin) * 0.08 or abs(ymax) * 0.1 or 1.0
    ymin, ymax = ymin - pad, ymax + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (fx(x) - xmin) / (xmax - xmin) * (right - left)
        py = bottom - (y - ymin) / (ymax - ymin) * (bottom - top)
        return px, py

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        yv = ymin + (ymax - ymin) * i / 4
        _, py = to_px(pts[0][0], yv)
        draw.line([left, py, right, py], fill=(225, 225, 225))
        draw.text((x0 + 4, py - 6), _fmt(yv), fill="black", font=font)
    xticks = sorted({x for x, _ in pts})
    for xv in xticks:
        px, _ = to_px(xv, ymin)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 3 * len(_fmt(xv)), bottom + 6), _fmt(xv), fill="black", font=font)
    draw.text((left + (right - left) // 2 - 3 * len(xlabel), bottom + 22), xlabel, fill="black", font=font)
    draw.text((x0 + 4, top - 16), ylabel, fill="black", font=font)
    for name, s in series.items():
        color = colors[name]
        line = [to_px(x, y) for x, y in s if y is not None and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)


def line_chart(
    path: str | os.PathLike,
    panels: Sequence[Mapping[str, object]],
    title: str = "",
    panel_size: tuple[int, int] = (420, 300),
) -> None:
    """Draw side-by-side line-chart panels into one PNG.

    Each panel is a mapping with ``series`` (``{name: [(x, y), ...]}``), and optional ``title``,
    ``xlabel``, ``ylabel`` and ``log_x``.  Series share colours across panels; one legend on top.
    """
    font = ImageFont.load_default()
    w, h = panel_size
    names: list[str] = []
    for p in panels:
        for n in p["series"]:  # type: ignore[union-attr]
            if n not in names:
                names.append(n)
    legend_h = 24
    title_h = 22 if title else 0
    img = Image.new("RGB", (w * len(panels), h + legend_h + title_h), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((8, 5), title, fill="black", font=font)
    x = 8
    for i, n in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        draw.rectangle([x, title_h + 8, x + 14, title_h + 18], fill=color)
        draw.text((x + 18, title_h + 7), n, fill="black", font=font)
        x += 30 + 7 * len(n)
    for i, p in enumerate(panels):
        series = {n: p["series"][n] for n in names if n in p["series"]}  # type: ignore[index]
        _panel(
            draw,
            (i * w, title_h + legend_h, (i + 1) * w, title_h + legend_h + h),
            series,
            str(p.get("title", "")),
            str(p.get("xlabel", "")),
            str(p.get("ylabel", "")),
            bool(p.get("log_x", False)),
            font,
            {n: PALETTE[j % len(PALETTE)] for j, n in enumerate(names)},
        )
    save_png_atomic(img, path)
