"""Command line of :mod:`lpd.orders` (``python -m lpd.orders``): order files and pictures.

Write the 50,000 orders of an evaluation run (all cores, progress bar)::

    python -m lpd.orders --img_size 256 --generation_steps 20 --repulsion_threshold 2.0 \\
        --num 50000 --seed 0 --output_file orders/lpd_orders_generated/res256_steps20_repulsion2.json

Draw one order::

    python -m lpd.orders --visualize --img_size 256 --generation_steps 20 \\
        --repulsion_threshold 2.0 --index 0 --output_file order.png

Order ``i`` depends only on ``(seed, i)``: the file is the same whatever ``--workers`` is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from lpd.orders.files import load_orders, save_orders
from lpd.orders.generate import _lpd_batch, lpd_orders, random_orders, raster_orders
from lpd.schedules import GroupSizeError, group_sizes, num_tokens, parse_group_sizes

__all__ = ["main", "build_parser"]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lpd.orders``."""
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m lpd.orders",
        description="Generate LPD generation orders (JSON order files) or draw one order (PNG).",
    )
    p.add_argument("--img_size", type=int, default=256, help="image side in pixels (256 or 512 released)")
    p.add_argument("--vqgan_stride", type=int, default=16, help="tokenizer down-sampling factor")
    p.add_argument("--generation_steps", type=int, default=20,
                   help="decoding steps (released table or cosine schedule)")
    p.add_argument("--group_sizes", type=str, default=None,
                   help="explicit schedule, e.g. '[1, 2, 4, ...]' or '[1*41, 2*46, 3*41]' "
                        "(overrides --generation_steps)")
    p.add_argument("--order", choices=("lpd", "random", "raster"), default="lpd", help="kind of order")
    p.add_argument("--proximity_threshold", type=float, default=1.0, help="τp of spec section 5")
    p.add_argument("--repulsion_threshold", type=float, default=1.0,
                   help="τr: 2.0 for the released 256 px settings, 3.0 for XXL-256, 4.0 at 512 px")
    p.add_argument("--num", type=int, default=50000, help="number of orders")
    p.add_argument("--seed", type=int, default=0, help="seed of the run; order i depends only on (seed, i)")
    p.add_argument("--start", type=int, default=0, help="index of the first order (to regenerate a slice)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="processes (default: all cores)")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="orders per task given to a worker (default: 2048 at 16x16, 512 at 32x32)")
    p.add_argument("--output_file", type=str, required=True, help="JSON order file, or PNG with --visualize")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    v = p.add_argument_group("--visualize")
    v.add_argument("--visualize", action="store_true",
                   help="write a PNG of one order instead of an order file")
    v.add_argument("--index", type=int, default=0, help="which order of the run to draw")
    v.add_argument("--orders_file", type=str, default=None, help="draw an order from this file instead")
    v.add_argument("--steps_shown", type=int, default=6, help="early steps drawn one by one")
    return p


def _chunk(task: tuple) -> np.ndarray:
    kind, start, count, sizes, grid, tp, tr, seed = task
    if kind == "lpd":
        return lpd_orders(count, sizes, grid, tp, tr, seed=seed, start=start)
    if kind == "random":
        return random_orders(count, grid, seed=seed, start=start)
    return raster_orders(count, grid)


def generate(args: argparse.Namespace, sizes: Sequence[int], grid: int) -> np.ndarray:
    """All ``args.num`` orders, in chunks over a process pool, with a progress bar."""
    from tqdm import tqdm

    tasks = [
        (args.order, args.start + s, min(args.chunk_size, args.num - s), list(sizes), grid,
         args.proximity_threshold, args.repulsion_threshold, args.seed)
        for s in range(0, args.num, args.chunk_size)
    ]
    out = np.empty((args.num, grid * grid), dtype=np.int64)
    bar = tqdm(total=args.num, unit="order", disable=args.no_progress, file=sys.stderr)
    if args.workers <= 1 or len(tasks) <= 1:
        results = map(_chunk, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=min(args.workers, len(tasks)))
        results = pool.map(_chunk, tasks)
    try:
        pos = 0
        for part in results:
            out[pos : pos + len(part)] = part
            pos += len(part)
            bar.update(len(part))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lpd.orders``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        n = num_tokens(args.img_size, args.vqgan_stride)
        grid = int(round(n**0.5))
        if args.group_sizes is not None:
            sizes = parse_group_sizes(args.group_sizes, n)
        else:
            sizes = group_sizes(args.img_size, args.generation_steps, args.vqgan_stride)
    except (GroupSizeError, ValueError) as e:
        parser.error(str(e))
    for name in ("num", "start", "seed"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if args.chunk_size is None:
        args.chunk_size = max(16, min(4096, (1 << 19) // n))
    if args.workers < 1 or args.chunk_size < 1:
        parser.error("--workers and --chunk_size must be >= 1")
    for name in ("proximity_threshold", "repulsion_threshold"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name} must be >= 0")

    if args.visualize:
        return _visualize(args, parser, sizes, grid)

    t0 = time.perf_counter()
    orders = generate(args, sizes, grid)
    save_orders(args.output_file, orders)
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.num} {args.order} orders ({grid}x{grid} grid, {len(sizes)} steps, "
        f"τp {args.proximity_threshold}, τr {args.repulsion_threshold}, seed {args.seed}) to "
        f"{args.output_file} in {dt:.1f} s",
        file=sys.stderr,
    )
    return 0


def _visualize(
    args: argparse.Namespace, parser: argparse.ArgumentParser, sizes: Sequence[int], grid: int
) -> int:
    from lpd.orders.visualize import render_order

    kinds = None
    if args.orders_file is not None:
        order = load_orders(args.orders_file, args.index + 1, grid)[args.index]
        title = f"{os.path.basename(args.orders_file)} row {args.index}"
    elif args.order == "lpd":
        o, k = _lpd_batch(np.array([args.start + args.index]), args.seed, list(sizes), grid,
                          args.proximity_threshold, args.repulsion_threshold, return_kinds=True)
        order, kinds = o[0], k[0]
        title = (f"LPD order {args.start + args.index} (seed {args.seed}), {len(sizes)} steps, "
                 f"tau_r {args.repulsion_threshold:g}")  # ASCII: the default font has no τ
    elif args.order == "random":
        order = random_orders(1, grid, seed=args.seed, start=args.start + args.index)[0]
        title = f"random order {args.start + args.index} (seed {args.seed}), {len(sizes)} steps"
    else:
        order = raster_orders(1, grid)[0]
        title = f"raster order, {len(sizes)} steps"
    img = render_order(order, sizes, grid, steps_shown=args.steps_shown, kinds=kinds, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    img.save(args.output_file)
    print(f"wrote {args.output_file}", file=sys.stderr)
    return 0
