"""PNG line charts with matplotlib (Agg, no pyplot state): panels side by side, one legend, log x
axes and error bars; the demo's ablation and the speed benchmarks draw with it."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from lpd.files import atomic_write_bytes


def line_chart(
    path: str | os.PathLike,
    panels: Sequence[Mapping[str, Any]],
    title: str = "",
    panel_size: tuple[int, int] = (420, 300),
) -> None:
    """Write side-by-side panels (``panel_size`` pixels each) into one PNG, atomically. A panel maps ``series`` to
    ``{name: [(x, y) or (x, y, low, high: an error bar), ...]}`` and may set ``title``, ``xlabel``, ``ylabel``, ``log_x``."""
    import matplotlib
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(name for p in panels for name in p["series"]))
    tab20 = matplotlib.colormaps["tab20"]
    colors = [f"C{i}" for i in range(10)] if len(names) <= 10 else [tab20(i) for i in range(20)]
    width = panel_size[0] * len(panels)
    fig = Figure(figsize=(width / 100, panel_size[1] / 100 + 0.6), dpi=100, layout="constrained")
    handles = {}
    for ax, p in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        series = p["series"]
        # on a log axis, series with error bars are spread a little sideways so their bars stay apart
        spread = p.get("log_x") and any(len(pt) == 4 for s in series.values() for pt in s)
        for k, (name, points) in enumerate(series.items()):
            color = colors[names.index(name) % len(colors)]
            shift = 1.04 ** (k - (len(series) - 1) / 2) if spread else 1.0
            x = [pt[0] * shift for pt in points]
            y = [math.nan if pt[1] is None else pt[1] for pt in points]
            handles[name] = ax.plot(x, y, "o-", ms=4, color=color)[0]
            bars = [
                (xi, (pt[2] + pt[3]) / 2, (pt[3] - pt[2]) / 2)
                for xi, pt in zip(x, points)
                if len(pt) == 4 and None not in pt
            ]
            if bars:
                bx, mid, half = zip(*bars)
                ax.errorbar(bx, mid, yerr=half, fmt="none", ecolor=color, capsize=3, lw=1)
        if p.get("log_x"):
            ax.set_xscale("log")
            xs = sorted({pt[0] for s in series.values() for pt in s if pt[0] > 0})
            if 0 < len(xs) <= 12:
                ax.set_xticks(xs, [f"{v:g}" if float(v).is_integer() else f"{v:.3g}" for v in xs])
                ax.minorticks_off()
        ax.set(title=p.get("title", ""), xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    if handles:
        ncols = max(1, min(len(handles), width // (6 * max(map(len, handles)) + 40)))
        lines, loc = list(handles.values()), "outside lower center"
        fig.legend(lines, list(handles), loc=loc, ncols=ncols, fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, width // 8), fontsize=10)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
