"""The CPU demo: train a small LPD on the embedded digits (``lpd.train``), train a digit classifier as
judge, sample ``num_images`` digits for every order x steps setting (``lpd.evaluate``), then edit the
held-out digits zero-shot (``lpd.editing``: inpainting, outpainting, class change), and score it all:
accuracy for the intended class and Fréchet distance, each with a 95% bootstrap interval.

Writes ``OUTPUT_DIR/metrics.json``, ``ablation.png``, ``samples/`` and the training run ``train/`` (reused by a rerun).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lpd.config import new_parser, parse_args_with_config, yaml_mapping
from lpd.demo.classifier import Judge, accuracy, train_classifier
from lpd.demo.common import DEMO_RUN, DemoInterrupted, reuse_run, run_main
from lpd.demo.digits import load_digits_dataset
from lpd.distributed import DistInfo
from lpd.editing import edit_tokens
from lpd.evaluate import RunSpec, generate_images
from lpd.files import atomic_write_bytes
from lpd.images import save_grid
from lpd.plotting import line_chart
from lpd.sampling import (
    ORDERS,
    SamplingConfig,
    add_sampling_args,
    decode_tokens,
    sampling_from_args,
)
from lpd.schedules import group_sizes
from lpd.tokenizer import make_tokenizer
from lpd.train import TrainConfig, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
EDIT_SETTINGS = (("lpd", "one"), ("lpd", "schedule"), ("random", "one"))  # (order, prefill)
# lpd.train.TrainConfig fields that the demo's flags set directly
_TRAIN_FIELDS = tuple(
    "model img_size model_config tokenizer vq_config epochs batch_size blr lr min_lr lr_schedule "
    "warmup_epochs lr_decay_start_epoch weight_decay grad_clip seed bf16 grad_checkpointing "
    "group_sizes_list log_freq".split()
)
# flags checked to be at least 1 (num_images: 2) before any work
_AT_LEAST_ONE = "epochs classifier_epochs num_images resamples eval_bsz grid_images edit_steps"


def _levels(args: argparse.Namespace) -> int:
    return int((args.vq_config or {}).get("levels", 4))


def _list(kind: type):
    return lambda text: [kind(t) for t in str(text).strip("[]").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("python -m lpd.demo", __doc__.split("\n\n")[0])
    a = p.add_argument
    config = os.path.normpath(DEFAULT_CONFIG)
    a("--config", default=config, help="YAML file of defaults (flags override it)")
    a("--output_dir", default="outputs/demo")
    t2i = "t2i: the text-to-image testbed (python -m lpd.demo --task t2i --help)"
    a("--task", choices=["class", "t2i"], default="class", help=t2i)
    a("--device", default="cpu")
    a("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    a("--model", default=None, help="a preset name, or none: model_config alone")
    a("--img_size", type=int, default=256)
    a("--model_config", type=yaml_mapping, default=None)
    a("--tokenizer", default="palette")
    a("--vq_config", type=yaml_mapping, default=None)
    a("--epochs", type=int, default=10)
    a("--batch_size", type=int, default=32)
    a("--blr", type=float, default=1e-4)
    a("--lr", type=float, default=None)
    a("--min_lr", type=float, default=0.0)
    a("--warmup_epochs", type=float, default=0.3)
    a("--lr_decay_start_epoch", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.02)
    a("--grad_clip", type=float, default=3.0)
    a("--seed", type=int, default=0)
    a("--log_freq", type=int, default=10)
    a("--lr_schedule", default="cosine")
    a("--grad_checkpointing", action="store_true")
    a("--group_sizes_list", default=None)
    a("--bf16", action="store_true")
    first = "use only the first N training digits (0: all)"
    a("--max_train_samples", type=int, default=0, help=first)
    a("--classifier_epochs", type=int, default=10)
    a("--orders", type=_list(str), default=list(ORDERS))
    a("--steps", type=_list(int), default=[8, 12, 20, 32, 256])
    a("--num_images", type=int, default=500, help="samples per setting (the digits 0-9 in turn)")
    a("--resamples", type=int, default=1000, help="bootstrap resamples per 95%% interval")
    a("--eval_bsz", type=int, default=100)
    paper = SamplingConfig(cfg=5.0, repulsion_threshold=2.0)
    add_sampling_args(p, paper, exclude=("order", "bf16"))
    a("--grid_images", type=int, default=40, help="samples shown in each setting's grid PNG")
    on = argparse.BooleanOptionalAction
    a("--editing", action=on, default=True, help="the zero-shot editing stage")
    steps = "decoding steps for the regenerated tokens of an edit"
    a("--edit_steps", type=int, default=8, help=steps)
    a("--edit_images", type=int, default=0, help="held-out digits edited per task (0: all 355)")
    threads = "torch CPU threads while sampling (0: leave as is); one is fastest on a busy machine"
    a("--decode_threads", type=int, default=1, help=threads)
    return p


def _check(args: argparse.Namespace) -> list[list[int]]:
    """Validate the flags before any work; returns the group sizes of each ``--steps`` value."""
    bad = [o for o in args.orders if o not in ORDERS]
    if bad or not args.orders:
        raise ValueError(f"--orders: unknown or no orders {bad}; choose from {', '.join(ORDERS)}")
    for flag in _AT_LEAST_ONE.split():
        least = 2 if flag == "num_images" else 1
        if getattr(args, flag) < least:
            raise ValueError(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            "the demo draws its chart with matplotlib, which is missing: pip install matplotlib"
        )
    try:
        return [group_sizes(args.img_size, s) for s in args.steps]
    except ValueError as e:
        raise ValueError(f"--steps {args.steps}: {e}") from None


def train_demo(args: argparse.Namespace, device: torch.device, log) -> torch.nn.Module:
    """Train into ``OUTPUT_DIR/train``; reuse a finished run of these settings, resume a cut one."""
    train_dir = os.path.join(args.output_dir, "train")
    fields = {k: getattr(args, k) for k in _TRAIN_FIELDS}
    config = TrainConfig(**fields, output_dir=train_dir, device=str(device), **DEMO_RUN)
    signature = {**fields, "max_train_samples": args.max_train_samples}
    if (model := reuse_run(config, signature, device, log)) is not None:
        return model
    tokens, labels = load_digits_dataset("train", levels=_levels(args))
    n = args.max_train_samples or len(labels)
    dataset = torch.utils.data.TensorDataset(tokens.flatten(1)[:n], labels[:n])
    result = train(config, info=DistInfo(0, 1, device), dataset=dataset, log=log)
    if result.preempted:
        raise DemoInterrupted(
            f"training was interrupted and saved in {train_dir}; run the same command again to continue"
        )
    return result.model.eval()


def _save_grid(args: argparse.Namespace, name: str, images: list, ncol: int, **labels) -> None:
    path = os.path.join(args.output_dir, "samples", f"{name}.png")
    save_grid(path, images, ncol=ncol, max_tile=64, **labels)


def _ablation(args, model, judge: Judge, schedules: list[list[int]], device, log) -> list[dict]:
    """Sample ``num_images`` digits (0-9 in turn) per order x steps setting; a score row each."""
    tokenizer = make_tokenizer(args.tokenizer, None, args.vq_config, args.seed, device)
    labels, rows, threads = np.arange(args.num_images) % 10, [], torch.get_num_threads()
    if args.decode_threads and device.type == "cpu":
        torch.set_num_threads(args.decode_threads)
    try:
        for order, (steps, sizes) in itertools.product(args.orders, zip(args.steps, schedules)):
            t0 = time.perf_counter()
            spec = RunSpec(args.num_images, sizes, labels, seed=args.seed, eval_bsz=args.eval_bsz)
            sampling = sampling_from_args(args, order=order)
            images = generate_images(model, tokenizer, spec, sampling).images
            seconds = time.perf_counter() - t0
            rows.append(
                dict(order=order, steps=steps, **judge.score(images, labels), seconds=seconds)
            )
            # a row shows the digits 0-9
            _save_grid(args, f"{order}_steps{steps}", list(images[: args.grid_images]), 10)
            log(_row(rows[-1]))
    finally:
        torch.set_num_threads(threads)
    return rows


def edit_keep_masks(grid: int) -> dict[str, np.ndarray]:
    """Known tokens ``[grid**2]`` per task: top half, all but a centre box, the box, left third."""
    box = np.zeros((grid, grid), bool)
    box[grid // 4 : grid - grid // 4, grid // 4 : grid - grid // 4] = True
    top, left = np.zeros((grid, grid), bool), np.zeros((grid, grid), bool)
    top[: grid // 2], left[:, : grid // 3] = True, True
    top, box, left = top.ravel(), box.ravel(), left.ravel()
    return dict(inpaint_bottom=top, inpaint_center=~box, outpaint=box, class_edit=left)


def _editing(args, model, judge: Judge, device: torch.device, log) -> list[dict[str, Any]]:
    """Edit held-out digits (class_edit: to (digit + 5) % 10): a row per setting, a grid per task"""
    tokenizer = make_tokenizer(args.tokenizer, None, args.vq_config, args.seed, device)
    tokens, digits = load_digits_dataset("test", levels=_levels(args))
    n, bsz = args.edit_images or len(digits), args.eval_bsz
    tokens, digits = tokens.flatten(1)[:n].to(device), digits[:n].numpy()
    decode = lambda t: decode_tokens(tokenizer, t, sampling_from_args(args))  # noqa: E731
    rows: list[dict[str, Any]] = []
    for task, keep in edit_keep_masks(model.grid_size).items():
        target = (digits + 5) % 10 if task == "class_edit" else digits
        masked = torch.where(torch.from_numpy(keep).to(device), tokens[:10], 1)
        shown = [decode(tokens[:10]), decode(masked)]  # source, masked
        for order, prefill in EDIT_SETTINGS:
            t0, g = time.perf_counter(), torch.Generator().manual_seed(args.seed)
            kw = dict(steps=args.edit_steps, generator=g, prefill=prefill)
            kw["sampling"] = sampling_from_args(args, order=order)
            edited = [
                edit_tokens(model, t, np.tile(keep, (len(t), 1)), target[i : i + bsz], **kw)
                for i, t in zip(range(0, n, bsz), tokens.split(bsz))
            ]
            images = decode(torch.cat(edited))
            row = dict(task=task, order=order, prefill=prefill, steps=args.edit_steps)
            row.update(judge.score(images, target), seconds=time.perf_counter() - t0)
            rows.append(row)
            shown.append(images[:10])
            log(_row(rows[-1]))
        names = ["source", "masked", *(f"{o} order, prefill {p}" for o, p in EDIT_SETTINGS)]
        grid = [im for row in shown for im in row]
        _save_grid(args, f"edit_{task}", grid, len(shown[0]), row_labels=names)
    return rows


def run_demo(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the whole demo; returns the ``metrics.json`` record."""
    schedules = _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, out, levels = torch.device(args.device), args.output_dir, _levels(args)
    timings, clock = {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage], clock = time.perf_counter() - clock, time.perf_counter()

    log("== 1/4 training LPD on the embedded digits (lpd.train)")
    model = train_demo(args, device, log)
    lap("train")
    log("== 2/4 training the digit classifier (the judge)")
    clf = train_classifier(args.seed, args.classifier_epochs, device, levels=levels)
    clf_acc = accuracy(clf, *load_digits_dataset("test", levels=levels))
    judge = Judge.held_out(clf, levels, resamples=args.resamples, seed=args.seed)
    log(f"classifier held-out accuracy: {clf_acc:.3f}")
    lap("judge")
    log(f"== 3/4 ablation: orders x steps, {args.num_images} samples each (lpd.evaluate)")
    rows = _ablation(args, model, judge, schedules, device, log)
    lap("ablation")
    edits = []
    if args.editing:
        stage = "== 4/4 zero-shot editing of the held-out digits (lpd.editing)"
        log(f"{stage}, {args.edit_steps} steps")
        edits = _editing(args, model, judge, device, log)
        lap("editing")
    _plot(rows, os.path.join(out, "ablation.png"), args)
    lap("plot")
    timings["total"] = sum(timings.values())
    plain = (int, float, str, bool, list, dict, type(None))
    record = {
        "classifier_accuracy": clf_acc,
        "ablation": rows,
        "editing": edits,
        "timings": timings,
        "settings": {k: v if isinstance(v, plain) else str(v) for k, v in vars(args).items()},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    text = json.dumps(record, indent=2).encode()
    atomic_write_bytes(os.path.join(out, "metrics.json"), lambda f: f.write(text))
    log(format_table(record))
    log(f"wrote {out}/metrics.json, ablation.png and samples/")
    return record


def _plot(rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    def panel(key: str, title: str, value: str | None = None) -> dict[str, Any]:
        series: dict[str, list[tuple]] = {}
        for r in rows:
            point = (r["steps"], r[value or key], *r.get(f"{key}_ci95", ()))
            series.setdefault(r["order"], []).append(point)
        return dict(series=series, title=title, xlabel="decoding steps", ylabel=key, log_x=True)

    frechet = "Fréchet distance to held-out digits, debiased (lower is better)"
    panels = [
        panel("accuracy", "class accuracy (higher is better)"),
        panel("frechet", frechet, "frechet_debiased"),
        panel("seconds", f"seconds for {args.num_images} samples"),
    ]
    title = f"LPD digits demo: {args.num_images} samples per point, 95% bootstrap intervals; "
    title += f"cfg {args.cfg}, temperature {args.temperature}, seed {args.seed}"
    line_chart(path, panels, title=title)


def _row(r: dict[str, Any]) -> str:
    (a0, a1), (f0, f1) = r["accuracy_ci95"], r["frechet_ci95"]
    first = f"| {r['task']} | {r['order']} | {r['prefill']} " if "task" in r else f"| {r['order']} "
    return (
        f"{first}| {r['steps']} | {r['accuracy']:.3f} [{a0:.3f}, {a1:.3f}] | "
        f"{r['frechet_debiased']:.1f} [{f0:.1f}, {f1:.1f}] | {r['seconds']:.1f} |"
    )


def format_table(record: dict[str, Any]) -> str:
    """The ablation (and the editing rows) as Markdown tables, intervals in brackets."""
    scores = "| accuracy [95% CI] | Fréchet, debiased [95% CI] | seconds |"
    lines = [
        f"classifier held-out accuracy: {record['classifier_accuracy']:.3f}",
        "",
        f"| order | steps {scores}",
        "| --- | ---: | ---: | ---: | ---: |",
        *map(_row, record["ablation"]),
    ]
    if record.get("editing"):
        head = f"| task | order | prefill | steps {scores}"
        lines += ["", head, "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += map(_row, record["editing"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run_demo(parse_args_with_config(build_parser(), argv)))
