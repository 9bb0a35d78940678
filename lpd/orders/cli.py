"""``python -m lpd.orders``: write the JSON order file of a run, or draw one order as a PNG.

    python -m lpd.orders --img_size 256 --generation_steps 20 --repulsion_threshold 2.0 \\
        --num 50000 --seed 0 --output_file orders/lpd_orders_generated/res256_steps20_repulsion2.json
    python -m lpd.orders --visualize --generation_steps 20 --repulsion_threshold 2.0 --index 0 --output_file order.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from lpd.config import ConfigError, check_seed, new_parser
from lpd.devices import available_cpus
from lpd.files import check_output_path
from lpd.images import write_png, written_by_lpd
from lpd.orders import visualize
from lpd.orders.files import OrderFileError, load_orders, save_orders
from lpd.orders.generate import default_batch_size, lpd_batch, random_orders, raster_orders
from lpd.orders.source import OrderSource
from lpd.schedules import group_sizes, num_tokens, parse_group_sizes


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lpd.orders``."""
    what = "Write LPD generation orders (a JSON order file) or draw one (PNG)."
    p = new_parser("python -m lpd.orders", what)
    a = p.add_argument
    a("--img_size", type=int, default=256, help="image side in pixels (256 or 512 released)")
    a("--vqgan_stride", type=int, default=16, help="tokenizer down-sampling factor")
    steps = "decoding steps (released table, else cosine)"
    a("--generation_steps", type=int, default=20, help=steps)
    sizes = "schedule such as '1,2,4' or '[1*41, 2*46, 3*41]' (over --generation_steps)"
    a("--group_sizes", help=sizes)
    a("--order", choices=("lpd", "random", "raster"), default="lpd", help="kind of order")
    tp = "τp: least support from decoded neighbours for a proximity pick"
    a("--proximity_threshold", type=float, default=1.0, help=tp)
    tr = "τr: 2.0 for the released 256 px settings, 3.0 for XXL-256, 4.0 at 512 px"
    a("--repulsion_threshold", type=float, default=1.0, help=tr)
    a("--num", type=int, default=50000, help="number of orders")
    a("--seed", type=int, default=0, help="seed of the run; order i depends only on (seed, i)")
    a("--start", type=int, default=0, help="index of the first order (to regenerate a slice)")
    workers = "processes (default: all cores); the file is the same"
    a("--workers", type=int, default=available_cpus(), help=workers)
    chunk = "orders per worker task (default: 2048 at 16x16, 512 at 32x32)"
    a("--chunk_size", type=int, help=chunk)
    a("--output_file", required=True, help="JSON order file, or PNG with --visualize")
    a("--no_progress", action="store_true", help="no progress bar")
    a("--overwrite", action="store_true", help="replace an existing --output_file")
    v = p.add_argument_group("--visualize").add_argument
    v("--visualize", action="store_true", help="write a PNG of one order instead of an order file")
    v("--index", type=int, default=0, help="which order of the run to draw")
    v("--orders_file", help="draw an order from this file instead")
    v("--steps_shown", type=int, default=6, help="early steps drawn one by one")
    return p


def generate(args: argparse.Namespace, sizes: Sequence[int], grid: int) -> np.ndarray:
    """All ``args.num`` orders, in chunks over a process pool, with a progress bar."""
    tp, tr = args.proximity_threshold, args.repulsion_threshold
    source = OrderSource(
        args.order, sizes, grid, seed=args.seed, proximity_threshold=tp, repulsion_threshold=tr
    )
    end, step = args.start + args.num, args.chunk_size
    tasks = [range(s, min(s + step, end)) for s in range(args.start, end, step)]
    out = np.empty((args.num, grid * grid), dtype=np.int64)
    workers = min(args.workers, len(tasks))
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with tqdm(total=args.num, unit="order", disable=args.no_progress, file=sys.stderr) as bar:
            for r, part in zip(tasks, (map if pool is None else pool.map)(source.rows, tasks)):
                out[r.start - args.start : r.stop - args.start] = part
                bar.update(len(part))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def _check_args(args: argparse.Namespace) -> tuple[list[int], int]:
    """Validate every flag and the output path before any order is made; returns (group sizes, grid side)."""
    try:
        n = num_tokens(args.img_size, args.vqgan_stride)
        if args.group_sizes is None:
            sizes = group_sizes(args.img_size, args.generation_steps, args.vqgan_stride)
        else:
            sizes = parse_group_sizes(args.group_sizes, n)
        check_seed(args.seed)
    except ValueError as e:  # GroupSizeError included
        raise ConfigError(str(e)) from None
    for name in ("num", "start", "proximity_threshold", "repulsion_threshold"):
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name} must be >= 0")
    args.chunk_size = default_batch_size(n) if args.chunk_size is None else args.chunk_size
    if args.workers < 1 or args.chunk_size < 1:
        raise ConfigError("--workers and --chunk_size must be >= 1")
    ours = written_by_lpd if args.visualize else None  # a picture lpd drew is replaced, not a file
    out, inputs = args.output_file, [("--orders_file", args.orders_file)]
    if problem := check_output_path(out, "--output_file", inputs, args.overwrite, ours):
        raise ConfigError(problem)
    suffix = ".png" if args.visualize else ".json"
    if not args.output_file.lower().endswith(suffix):
        what = "a JSON order file (--visualize draws a PNG)"
        what = "a PNG picture with --visualize" if args.visualize else what
        raise ConfigError(f"--output_file {args.output_file}: must end in {suffix}, it is {what}")
    if args.visualize and args.index < 0:
        raise ConfigError(f"--index must be >= 0, got {args.index}")
    if args.visualize and args.orders_file is None and args.index >= args.num:
        raise ConfigError(
            f"--index {args.index} is outside the run of --num {args.num} orders; use 0..{args.num - 1}"
        )
    return sizes, int(round(n**0.5))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lpd.orders``; exit 0, 1 when writing the finished file failed, 2 for a usage error (found first)."""
    args = build_parser().parse_args(argv)
    try:
        sizes, grid = _check_args(args)
        drawn = _order_to_draw(args, sizes, grid) if args.visualize else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if drawn is not None:
            (order, kinds, title), shown = drawn, args.steps_shown
            img = visualize.render_order(order, sizes, grid, shown, kinds=kinds, title=title)
            write_png(args.output_file, np.asarray(img.convert("RGB")))
            print(f"wrote {args.output_file}", file=sys.stderr)
            return 0
        save_orders(args.output_file, generate(args, sizes, grid))
    except OSError as e:
        error = f"error: could not write --output_file {args.output_file}: {e.strerror or e}"
        print(error, file=sys.stderr)
        return 1
    what = f"{args.num} {args.order} orders ({grid}x{grid} grid, {len(sizes)} steps, τp "
    what += f"{args.proximity_threshold}, τr {args.repulsion_threshold}, seed {args.seed})"
    seconds = time.perf_counter() - t0
    print(f"wrote {what} to {args.output_file} in {seconds:.1f} s", file=sys.stderr)
    return 0


def _order_to_draw(args: argparse.Namespace, sizes: Sequence[int], grid: int) -> tuple:
    """The order ``--visualize`` draws, its pick kinds (LPD only) and a caption."""
    i = args.start + args.index
    if args.orders_file is not None:
        try:
            order = load_orders(args.orders_file, args.index + 1, grid)[args.index]
        except OSError as e:
            raise ConfigError(f"--orders_file {args.orders_file}: {e.strerror or e}") from None
        except OrderFileError as e:
            raise ConfigError(f"--orders_file, drawing row --index {args.index}: {e}") from None
        return order, None, f"{os.path.basename(args.orders_file)} row {args.index}"
    if args.order == "lpd":
        tp, tr = args.proximity_threshold, args.repulsion_threshold
        o, k = lpd_batch(np.array([i]), args.seed, list(sizes), grid, tp, tr, return_kinds=True)
        # ASCII caption: the default font has no τ
        return o[0], k[0], f"LPD order {i} (seed {args.seed}), {len(sizes)} steps, tau_r {tr:g}"
    if args.order == "random":
        order = random_orders(1, grid, seed=args.seed, start=i)[0]
        return order, None, f"random order {i} (seed {args.seed})"
    return raster_orders(1, grid)[0], None, f"raster order, {len(sizes)} steps"
