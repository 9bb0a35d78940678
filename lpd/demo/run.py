"""The CPU demo: train a small LPD on the embedded digits (``lpd.train``), train a digit classifier as
judge, sample ``num_images`` digits for every order x steps setting (``lpd.evaluate``), then edit the
held-out digits zero-shot (``lpd.editing``: inpainting, outpainting, class change), and score it all:
accuracy for the intended class and Fréchet distance, each with a 95% bootstrap interval.

Writes ``OUTPUT_DIR/metrics.json``, ``ablation.png``, ``samples/`` and the training run ``train/`` (reused by a rerun).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lpd.config import HelpFormatter, parse_args_with_config, yaml_mapping
from lpd.demo.classifier import Judge, accuracy, train_classifier
from lpd.sampling import ORDERS, SamplingConfig, add_sampling_args, sampling_from_args

__all__ = ["main", "build_parser", "run_demo", "format_table", "DemoInterrupted"]

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
EDIT_SETTINGS = (
    ("lpd", "one"),
    ("lpd", "schedule"),
    ("random", "one"),
)  # (order of the unknown part, prefill)
# lpd.train.TrainConfig fields that the demo's flags set directly
_TRAIN_FIELDS = (
    "model",
    "img_size",
    "model_config",
    "tokenizer",
    "vq_config",
    "epochs",
    "batch_size",
    "blr",
    "lr",
    "min_lr",
    "lr_schedule",
    "warmup_epochs",
    "lr_decay_start_epoch",
    "weight_decay",
    "grad_clip",
    "seed",
    "bf16",
    "grad_checkpointing",
    "group_sizes_list",
    "log_freq",
)


def _levels(args: argparse.Namespace) -> int:
    return int((args.vq_config or {}).get("levels", 4))


class DemoInterrupted(RuntimeError):
    """Training stopped on a signal after saving; rerunning the demo resumes it."""


def _list(kind: type):
    return lambda text: [kind(t) for t in str(text).strip("[]").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m lpd.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        default=os.path.normpath(DEFAULT_CONFIG),
        help="YAML file of defaults (flags override it)",
    )
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument(
        "--task",
        choices=["class", "t2i"],
        default="class",
        help="t2i: the text-to-image testbed (python -m lpd.demo --task t2i --help)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--model", default=None, help="a preset name, or none: model_config alone")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--model_config", type=yaml_mapping, default=None)
    p.add_argument("--tokenizer", default="palette")
    p.add_argument("--vq_config", type=yaml_mapping, default=None)
    for name, kind, default in (
        ("epochs", int, 10),
        ("batch_size", int, 32),
        ("blr", float, 1e-4),
        ("lr", float, None),
        ("min_lr", float, 0.0),
        ("warmup_epochs", float, 0.3),
        ("lr_decay_start_epoch", float, 0.0),
        ("weight_decay", float, 0.02),
        ("grad_clip", float, 3.0),
        ("seed", int, 0),
        ("log_freq", int, 10),
    ):
        p.add_argument(f"--{name}", type=kind, default=default)
    p.add_argument("--lr_schedule", default="cosine")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--group_sizes_list", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--max_train_samples",
        type=int,
        default=0,
        help="use only the first N training digits (0: all)",
    )
    p.add_argument("--classifier_epochs", type=int, default=10)
    p.add_argument("--orders", type=_list(str), default=list(ORDERS))
    p.add_argument("--steps", type=_list(int), default=[8, 12, 20, 32, 256])
    p.add_argument(
        "--num_images", type=int, default=500, help="samples per setting (the digits 0-9 in turn)"
    )
    p.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples per 95%% interval"
    )
    p.add_argument("--eval_bsz", type=int, default=100)
    add_sampling_args(
        p, SamplingConfig(cfg=5.0, repulsion_threshold=2.0), exclude=("order", "bf16")
    )
    p.add_argument(
        "--grid_images", type=int, default=40, help="samples shown in each setting's grid PNG"
    )
    p.add_argument(
        "--editing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the zero-shot editing stage",
    )
    p.add_argument(
        "--edit_steps",
        type=int,
        default=8,
        help="decoding steps for the regenerated tokens of an edit",
    )
    p.add_argument(
        "--edit_images", type=int, default=0, help="held-out digits edited per task (0: all 355)"
    )
    p.add_argument(
        "--decode_threads",
        type=int,
        default=1,
        help="torch CPU threads while sampling (0: leave as is); one is fastest on a busy machine",
    )
    return p


def _check(args: argparse.Namespace) -> list[list[int]]:
    """Validate the flags before any work; returns the group sizes of each ``--steps`` value."""
    from lpd.schedules import group_sizes

    bad = [o for o in args.orders if o not in ORDERS]
    if bad or not args.orders:
        raise ValueError(f"--orders: unknown or no orders {bad}; choose from {', '.join(ORDERS)}")
    for flag in (
        "epochs",
        "classifier_epochs",
        "num_images",
        "resamples",
        "eval_bsz",
        "grid_images",
        "edit_steps",
    ):
        if getattr(args, flag) < (2 if flag == "num_images" else 1):
            raise ValueError(
                f"--{flag} must be at least {2 if flag == 'num_images' else 1}, got {getattr(args, flag)}"
            )
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            "the demo draws its chart with matplotlib, which is missing: pip install matplotlib"
        )
    try:
        return [group_sizes(args.img_size, s) for s in args.steps]
    except ValueError as e:
        raise ValueError(f"--steps {args.steps}: {e}") from None


#: TrainConfig fields of the demos' training runs: one process, no checkpoints but the last
DEMO_RUN = dict(num_workers=0, pin_mem=False, save_every_steps=0, save_every_epochs=0, eval_freq=0)


def reuse_run(config: Any, signature: dict[str, Any], device: torch.device, log) -> Any:
    """The model of a finished run of ``signature`` in ``config.output_dir``, else None (an
    interrupted one: ``config.resume`` set); a run of other settings is refused."""
    from lpd.files import atomic_write_bytes, load_checkpoint
    from lpd.models import load_lpd

    out, signature = config.output_dir, json.loads(json.dumps(signature))
    last, sig_path = (os.path.join(out, n) for n in ("checkpoint-last.pth", "demo_signature.json"))
    if os.path.isfile(last):
        saved = None
        if os.path.isfile(sig_path):
            with open(sig_path, encoding="utf-8") as f:
                saved = json.load(f)
        if saved != signature:
            raise ValueError(
                f"{out} holds a training run of other settings; use another --output_dir "
                f"or delete {out} to train again"
            )
        ckpt = load_checkpoint(last)
        if ckpt["epoch"] + 1 >= config.epochs and ckpt["step"] >= ckpt["steps_per_epoch"]:
            log(f"reusing the trained model in {out}")
            return load_lpd(last).to(device).eval()
        log(f"resuming the interrupted training run in {out}")
        config.resume = out
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(sig_path, lambda f: f.write(json.dumps(signature).encode()))
    return None


def train_demo(args: argparse.Namespace, device: torch.device, log) -> torch.nn.Module:
    """Train into ``OUTPUT_DIR/train``, reusing a finished run of the same settings or resuming an interrupted one."""
    from lpd.demo.digits import load_digits_dataset
    from lpd.distributed import DistInfo
    from lpd.train import TrainConfig, train

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


def _ablation(
    args: argparse.Namespace,
    model: torch.nn.Module,
    judge: Judge,
    schedules: list[list[int]],
    device: torch.device,
    log,
) -> list[dict[str, Any]]:
    """Sample ``num_images`` digits (0-9 in turn) per order x steps setting and score them; one row each."""
    from lpd.evaluate import RunSpec, generate_images
    from lpd.images import save_grid
    from lpd.tokenizer import make_tokenizer

    tokenizer = make_tokenizer(args.tokenizer, None, args.vq_config, args.seed, device)
    labels = np.arange(args.num_images) % 10
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    if args.decode_threads and device.type == "cpu":
        torch.set_num_threads(args.decode_threads)
    try:
        for order in args.orders:
            for steps, sizes in zip(args.steps, schedules):
                t0 = time.perf_counter()
                spec = RunSpec(
                    args.num_images, sizes, labels, seed=args.seed, eval_bsz=args.eval_bsz
                )
                sampling = sampling_from_args(args, order=order)
                images = generate_images(model, tokenizer, spec, sampling).images
                seconds = time.perf_counter() - t0
                rows.append(
                    {
                        "order": order,
                        "steps": steps,
                        **judge.score(images, labels),
                        "seconds": seconds,
                    }
                )
                save_grid(
                    os.path.join(args.output_dir, "samples", f"{order}_steps{steps}.png"),
                    list(images[: args.grid_images]),
                    ncol=10,
                    max_tile=64,
                )  # a row shows the digits 0-9
                log(_row(rows[-1]))
    finally:
        torch.set_num_threads(threads)
    return rows


def edit_keep_masks(grid: int) -> dict[str, np.ndarray]:
    """Known tokens ``[grid * grid]`` of each editing task: the top half, all but the centre box, the box, the left third."""
    box = np.zeros((grid, grid), bool)
    box[grid // 4 : grid - grid // 4, grid // 4 : grid - grid // 4] = True
    top, left = np.zeros((grid, grid), bool), np.zeros((grid, grid), bool)
    top[: grid // 2], left[:, : grid // 3] = True, True
    return {
        "inpaint_bottom": top.ravel(),
        "inpaint_center": ~box.ravel(),
        "outpaint": box.ravel(),
        "class_edit": left.ravel(),
    }


def _editing(
    args: argparse.Namespace, model: torch.nn.Module, judge: Judge, device: torch.device, log
) -> list[dict[str, Any]]:
    """Edit every held-out digit (as itself, or ``(digit + 5) % 10`` for ``class_edit``): a row per setting, a grid per task."""
    from lpd.demo.digits import load_digits_dataset
    from lpd.editing import edit_tokens
    from lpd.images import save_grid
    from lpd.sampling import decode_tokens
    from lpd.tokenizer import make_tokenizer

    tokenizer = make_tokenizer(args.tokenizer, None, args.vq_config, args.seed, device)
    tokens, digits = load_digits_dataset("test", levels=_levels(args))
    n = args.edit_images or len(digits)
    tokens, digits = tokens.flatten(1)[:n].to(device), digits[:n].numpy()
    decode = lambda t: decode_tokens(tokenizer, t, sampling_from_args(args))  # noqa: E731
    rows: list[dict[str, Any]] = []
    for task, keep in edit_keep_masks(model.grid_size).items():
        target = (digits + 5) % 10 if task == "class_edit" else digits
        shown = [
            decode(tokens[:10]),
            decode(torch.where(torch.from_numpy(keep).to(device), tokens[:10], 1)),
        ]  # source, masked
        for order, prefill in EDIT_SETTINGS:
            t0, g = time.perf_counter(), torch.Generator().manual_seed(args.seed)
            edited = torch.cat(
                [
                    edit_tokens(
                        model,
                        tokens[i : i + args.eval_bsz],
                        np.tile(keep, (len(tokens[i : i + args.eval_bsz]), 1)),
                        target[i : i + args.eval_bsz],
                        steps=args.edit_steps,
                        generator=g,
                        prefill=prefill,
                        sampling=sampling_from_args(args, order=order),
                    )
                    for i in range(0, n, args.eval_bsz)
                ]
            )
            images = decode(edited)
            rows.append(
                {
                    "task": task,
                    "order": order,
                    "prefill": prefill,
                    "steps": args.edit_steps,
                    **judge.score(images, target),
                    "seconds": time.perf_counter() - t0,
                }
            )
            shown.append(images[:10])
            log(_row(rows[-1]))
        names = ["source", "masked", *(f"{o} order, prefill {p}" for o, p in EDIT_SETTINGS)]
        save_grid(
            os.path.join(args.output_dir, "samples", f"edit_{task}.png"),
            [im for row in shown for im in row],
            ncol=len(shown[0]),
            max_tile=64,
            row_labels=names,
        )
    return rows


def run_demo(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the whole demo; returns the ``metrics.json`` record."""
    from lpd.demo.digits import load_digits_dataset
    from lpd.files import atomic_write_bytes

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
    clf = train_classifier(
        seed=args.seed, epochs=args.classifier_epochs, device=device, levels=levels
    )
    clf_acc = accuracy(clf, *load_digits_dataset("test", levels=levels))
    judge = Judge.held_out(clf, levels, resamples=args.resamples, seed=args.seed)
    log(f"classifier held-out accuracy: {clf_acc:.3f}")
    lap("judge")
    log(f"== 3/4 ablation: orders x steps, {args.num_images} samples each (lpd.evaluate)")
    rows = _ablation(args, model, judge, schedules, device, log)
    lap("ablation")
    edits = []
    if args.editing:
        log(
            f"== 4/4 zero-shot editing of the held-out digits (lpd.editing), {args.edit_steps} steps"
        )
        edits = _editing(args, model, judge, device, log)
        lap("editing")
    _plot(rows, os.path.join(out, "ablation.png"), args)
    lap("plot")
    timings["total"] = sum(timings.values())
    settings = {
        k: v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)
        for k, v in vars(args).items()
    }
    record = {
        "classifier_accuracy": clf_acc,
        "ablation": rows,
        "editing": edits,
        "timings": timings,
        "settings": settings,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_bytes(
        os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(record, indent=2).encode())
    )
    log(format_table(record))
    log(f"wrote {out}/metrics.json, ablation.png and samples/")
    return record


def _plot(rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    from lpd.plotting import line_chart

    def panel(key: str, title: str, value: str | None = None) -> dict[str, Any]:
        series: dict[str, list[tuple]] = {}
        for r in rows:
            series.setdefault(r["order"], []).append(
                (r["steps"], r[value or key], *r.get(f"{key}_ci95", ()))
            )
        return {
            "series": series,
            "title": title,
            "xlabel": "decoding steps",
            "ylabel": key,
            "log_x": True,
        }

    line_chart(
        path,
        [
            panel("accuracy", "class accuracy (higher is better)"),
            panel(
                "frechet",
                "Fréchet distance to held-out digits, debiased (lower is better)",
                "frechet_debiased",
            ),
            panel("seconds", f"seconds for {args.num_images} samples"),
        ],
        title=f"LPD digits demo: {args.num_images} samples per point, 95% bootstrap intervals; "
        f"cfg {args.cfg}, temperature {args.temperature}, seed {args.seed}",
    )


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
        lines += [
            "",
            f"| task | order | prefill | steps {scores}",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
            *map(_row, record["editing"]),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(lambda: run_demo(parse_args_with_config(build_parser(), argv)))


def run_main(run: Any) -> int:
    """Exit status of ``run()``: 0, 75 (interrupted, a rerun resumes) or 2 (one ``error:`` line)."""
    try:
        run()
    except DemoInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 75
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
