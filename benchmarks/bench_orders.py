"""Benchmark of the locality-aware order generator on ONE core, with the orders' statistics.

Times :func:`lpd.orders.lpd_orders` at 256 px / 20 steps / τr 2 and 512 px / 48 steps / τr 4 and
prints orders/second and ms/order next to the released pure-Python generator's figures (28 ms and
640 ms per order on one core) and the goals (<= 0.28 ms and <= 2.1 ms), then 1024 px (64 x 64
tokens, text-to-image) in 32 / 48 / 64 / 96 cosine steps at τr 8 (goal <= 20 ms; the released
generator has no 1024 px setting), each setting also with the lower half of the grid known
(zero-shot editing), then the three order statistics (context support, group spread, close pairs)
next to the released generator's and those of random orders.
``--check N`` first checks that every step of N orders of each setting follows the rules, with the
independent plain reading of the tests (``tests/orders_reference.py``; pure Python: a fraction of a
second per order at 256 px, seconds at 512 px).

One core: BLAS/OpenMP thread counts are set to 1 before numpy is imported and, on Linux, the
process is pinned to a single CPU (``--cpu``).  Times are CPU time of this process (best of
``--repeats``); wall time is reported too.  On a machine shared with other jobs both grow, so
the load average is printed alongside, and ``--released_generator PATH`` (a local copy of the
released generator's file, not shipped here) times the released generator in the same run for a
same-machine speed-up (the goals are 100x at 256/20 and 300x at 512/48).

    python benchmarks/bench_orders.py --output_json benchmarks/bench_orders.json

writes the numbers as JSON and a bar chart next to it (same name, ``.png``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lpd.orders import (  # noqa: E402
    RELEASED_STATISTICS,
    group_sizes,
    lpd_orders,
    order_statistics,
    random_orders,
)
from lpd.schedules import scaled_group_sizes  # noqa: E402

SETTINGS = [
    # name, img_size, steps, τr, released ms/order, goal ms/order, statistics key
    ("256/20 tau_r=2", 256, 20, 2.0, 28.0, 0.28, "256/20 tau_r=2"),
    ("512/48 tau_r=4", 512, 48, 4.0, 640.0, 2.1, "512/48 tau_r=4"),
] + [(f"1024/{k} tau_r=8", 1024, k, 8.0, None, 20.0, None) for k in (32, 48, 64, 96)]
STAT_NAMES = ("context_support", "group_spread", "close_pairs")


def _pin(cpu: int | None) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this platform)"
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0] if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def _load_released(path: str):
    """``lpd_order_schedule`` from a user-supplied copy of the released generator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("released_lpd_order", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.lpd_order_schedule


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return cpu, wall


def _half_known(img: int, steps: int) -> tuple[np.ndarray, list[int]]:
    """The lower half of the grid known, and group sizes for the upper half."""
    n = (img // 16) ** 2
    return np.arange(n) >= n // 2, scaled_group_sizes(n // 2, steps, img)


def check(num: int) -> None:
    """Check ``num`` orders of each setting against the rules of the plain reference (exit 1 on a break)."""
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    )
    from orders_reference import check_order

    for name, img, steps, tr, *_ in SETTINGS:
        if img > 512:  # the plain reference takes minutes per 64 x 64 order (the tests pin them)
            continue
        grid = img // 16
        for known, sizes in ((None, group_sizes(img, steps)), _half_known(img, steps)):
            fast = lpd_orders(num, sizes, grid, 1.0, tr, seed=0, known=known)
            for i in range(num):
                try:
                    check_order(fast[i], sizes, grid, 1.0, tr, known=known)
                except AssertionError as e:
                    raise SystemExit(
                        f"{name}: order {i} breaks the rules (known: {known is not None}): {e}"
                    ) from None
    print(
        f"checked: {num} orders of each setting, without and with the lower half known, follow the rules"
    )


def run(args: argparse.Namespace) -> dict:
    pin = _pin(args.cpu)
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "one_core": pin,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": [],
    }
    for name, img, steps, tr, released_ms, goal_ms, key in SETTINGS:
        num = {256: args.num_256, 512: args.num_512}.get(img, args.num_1024)
        sizes = group_sizes(img, steps)
        grid = img // 16
        lpd_orders(8, sizes, grid, 1.0, tr, seed=args.seed + 1)  # warm-up: tables, caches
        box: dict = {}

        def gen() -> None:
            box["orders"] = lpd_orders(
                num, sizes, grid, 1.0, tr, seed=args.seed, batch_size=args.batch_size
            )

        cpu, wall = _time(gen, args.repeats)
        ms = min(cpu) / num * 1e3
        known, half_sizes = _half_known(img, steps)
        cpu_known, _ = _time(
            lambda: lpd_orders(
                num,
                half_sizes,
                grid,
                1.0,
                tr,
                seed=args.seed,
                batch_size=args.batch_size,
                known=known,
            ),
            args.repeats,
        )
        stats = order_statistics(box["orders"], sizes, grid, tr)
        entry = {
            "setting": name,
            "num_orders": num,
            "ms_per_order": ms,
            "orders_per_second": 1e3 / ms,
            "ms_per_order_median": statistics.median(cpu) / num * 1e3,
            "ms_per_order_wall": min(wall) / num * 1e3,
            "released_ms_per_order": released_ms,
            "goal_ms_per_order": goal_ms,
            "speedup_vs_released": released_ms / ms if released_ms else None,
            "ms_per_order_half_known": min(cpu_known) / num * 1e3,
            "statistics": stats,
            "released_statistics": RELEASED_STATISTICS[key] if key else None,
        }
        if args.released_generator and released_ms:
            rel = _load_released(args.released_generator)
            n_rel = args.released_orders if img == 256 else max(1, args.released_orders // 5)
            rel_cpu, _ = _time(lambda: [rel(sizes, grid, 1.0, tr) for _ in range(n_rel)], 1)
            entry["released_measured_ms_per_order"] = rel_cpu[0] / n_rel * 1e3
            entry["speedup_vs_released_measured"] = entry["released_measured_ms_per_order"] / ms
        if img == 256:
            rnd = random_orders(num, grid, seed=args.seed)
            entry["random_statistics"] = order_statistics(rnd, sizes, grid, tr)
            entry["released_random_statistics"] = RELEASED_STATISTICS["random 256/20 tau_r=2"]
        result["settings"].append(entry)
    return result


def report(result: dict) -> str:
    lines = [
        f"lpd.orders benchmark - {result['one_core']}, numpy {result['numpy']}, "
        f"load average {', '.join(f'{x:.2f}' for x in result['load_average'] or [])}",
        "",
        f"{'setting':<16}{'orders':>8}{'orders/s':>10}{'ms/order':>10}{'wall':>8}{'goal':>7}"
        f"{'met':>5}{'released':>10}{'speed-up':>10}",
    ]
    for e in result["settings"]:
        met = "yes" if e["ms_per_order"] <= e["goal_ms_per_order"] else "no"
        lines.append(
            f"{e['setting']:<16}{e['num_orders']:>8}{e['orders_per_second']:>10.0f}"
            f"{e['ms_per_order']:>10.3f}{e['ms_per_order_wall']:>8.3f}{e['goal_ms_per_order']:>7.2f}"
            + (
                f"{met:>5}{e['released_ms_per_order']:>8.0f}ms{e['speedup_vs_released']:>9.0f}x"
                if e["released_ms_per_order"]
                else f"{met:>5}{'-':>10}{'-':>10}"
            )
        )
    for e in result["settings"]:
        lines.append(
            f"{e['setting']:<16} lower half known (zero-shot editing): "
            f"{e['ms_per_order_half_known']:.3f} ms/order"
        )

    def goal_x(e: dict) -> float:
        return e["released_ms_per_order"] / e["goal_ms_per_order"]

    measured = [e for e in result["settings"] if "released_measured_ms_per_order" in e]
    for e in measured:
        lines.append(
            f"{e['setting']:<16} released generator measured here: "
            f"{e['released_measured_ms_per_order']:.1f} ms/order -> speed-up "
            f"{e['speedup_vs_released_measured']:.0f}x on this machine now (goal "
            f"{goal_x(e):.0f}x: {'met' if e['speedup_vs_released_measured'] >= goal_x(e) else 'not met'})"
        )
    lines += [
        "",
        f"{'statistics':<40}{'context support':>16}{'group spread':>14}{'close pairs':>13}",
    ]
    for e in result["settings"]:
        rows = [("this generator", e["statistics"])]
        if e["released_statistics"]:
            rows.append(("released generator", e["released_statistics"]))
        if "random_statistics" in e:
            rows += [
                ("random orders (this)", e["random_statistics"]),
                ("random orders (released)", e["released_random_statistics"]),
            ]
        for label, st in rows:
            lines.append(
                f"{e['setting'] + ' ' + label:<40}{st['context_support']:>16.3f}"
                f"{st['group_spread']:>14.3f}{st['close_pairs']:>13.3f}"
            )
    lines.append("")
    lines.append(
        "ms/order: best CPU time of the repeats / number of orders (one process on one core);"
    )
    lines.append("wall: best wall-clock time / orders; met: ms/order <= goal.")
    return "\n".join(lines)


def bar_chart(result: dict, path: str) -> None:
    """ms/order of the released generator and of this one, log scale (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
        small = ImageFont.load_default(size=12)
    except TypeError:
        font = small = ImageFont.load_default()
    w, h, left, bottom, top = 160 + 170 * len(result["settings"]), 360, 70, 50, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), "ms per order on one core (log scale)", font=font, fill="black")
    lo, hi = -2.0, 3.0  # 0.01 ms .. 1000 ms
    plot_h = h - top - bottom

    def y(ms: float) -> float:
        return top + plot_h * (1 - (math.log10(max(ms, 10**lo)) - lo) / (hi - lo))

    for e10 in range(int(lo), int(hi) + 1):
        yy = y(10.0**e10)
        d.line((left, yy, w - 20, yy), fill=(225, 225, 225))
        d.text((8, yy - 7), f"{10.0**e10:g} ms", font=small, fill=(90, 90, 90))
    groups = result["settings"]
    slot = (w - left - 20) / len(groups)
    for gi, e in enumerate(groups):
        x0 = left + gi * slot + 20
        released = e["released_ms_per_order"]
        bars = [("released", released, (160, 160, 160))] if released else []
        bars += [
            ("goal", e["goal_ms_per_order"], (120, 170, 230)),
            ("this", e["ms_per_order"], (235, 100, 20)),
        ]
        bw = (slot - 60) / len(bars)
        for bi, (label, ms, col) in enumerate(bars):
            bx = x0 + bi * (bw + 8)
            d.rectangle((bx, y(ms), bx + bw, top + plot_h), fill=col)
            d.text((bx, y(ms) - 16), f"{ms:.3g}", font=small, fill="black")
            d.text((bx, top + plot_h + 4), label, font=small, fill="black")
        d.text((x0, h - 22), e["setting"], font=font, fill="black")
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_256", type=int, default=2000, help="orders timed at 256/20")
    p.add_argument("--num_512", type=int, default=400, help="orders timed at 512/48")
    p.add_argument("--num_1024", type=int, default=128, help="orders timed at each 1024 px setting")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the best counts)")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="orders generated together (default: automatic)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)"
    )
    p.add_argument(
        "--output_json", type=str, default=None, help="write the numbers here (+ a .png chart)"
    )
    p.add_argument(
        "--released_generator",
        type=str,
        default=None,
        help="optional path to the released generator's Python file (defines "
        "lpd_order_schedule(group_sizes, grid_size, proximity_threshold, "
        "repulsion_threshold)); it is timed here too, for a same-machine speed-up",
    )
    p.add_argument(
        "--released_orders", type=int, default=5, help="orders timed with --released_generator"
    )
    p.add_argument(
        "--check",
        type=int,
        default=0,
        help="first check this many orders of each setting with tests/orders_reference.py",
    )
    args = p.parse_args()
    if args.check > 0:
        check(args.check)
    result = run(args)
    print(report(result))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        png = os.path.splitext(args.output_json)[0] + ".png"
        bar_chart(result, png)
        print(f"wrote {args.output_json} and {png}")


if __name__ == "__main__":
    main()
