"""The CPU demo: train a small LPD on handwritten digits, decode it with every order and step
count, and score the samples — through the library's real training and evaluation code.

``python -m lpd.demo --output_dir outputs/demo`` (or ``bash scripts/demo.sh``) runs, with the
defaults of ``configs/demo.yaml``:

1. **Data**: the embedded digits (:mod:`lpd.demo.digits`) on the 16x16 token grid of 256 px,
   tokenised by the exact palette tokenizer; 1,442 for training, 355 held out.
2. **Training**: :func:`lpd.train.train` (the loop behind ``main_train.py``): random orders per
   sample, group sizes drawn from the nine released 256 px schedules, label dropout, AdamW.
3. **Judge**: a small digit classifier (:mod:`lpd.demo.classifier`) trained on the training split;
   its held-out accuracy is reported.
4. **Ablation** (the paper's order x steps study on this testbed): for orders {lpd, random,
   raster} x steps {8, 12, 20, 32, 256}, the same model and seed sample ``num_images`` digits
   through :func:`lpd.evaluate.generate_images`; reported are the classifier's accuracy on them,
   a Fréchet distance in its feature space against the held-out digits (computed by
   :mod:`lpd.metrics`, the FID code, with the classifier as feature extractor) and seconds.

Writes ``OUTPUT_DIR/metrics.json`` (``{"classifier_accuracy", "ablation": [{"order", "steps",
"accuracy", "frechet", "seconds"}, ...], ...}``), ``OUTPUT_DIR/ablation.png`` (accuracy and
Fréchet distance vs steps per order), ``OUTPUT_DIR/samples/{order}_steps{S}.png`` (a grid per
setting), ``OUTPUT_DIR/train/`` (checkpoints and logs of the training run) and prints a table.
A finished training run is reused when the demo is run again into the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

from lpd.config import parse_args_with_config, yaml_mapping
from lpd.sampling import SamplingConfig, add_sampling_args, sampling_from_args

__all__ = ["main", "build_parser", "run_demo", "DemoInterrupted"]


class DemoInterrupted(RuntimeError):
    """The training stage stopped on a signal after saving; rerunning the demo resumes it."""

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "demo.yaml")

# Fields of lpd.train.TrainConfig that the demo's flags set directly.
_TRAIN_FIELDS = (
    "model", "img_size", "model_config", "tokenizer", "vq_config", "epochs", "batch_size", "blr", "lr", "min_lr",
    "lr_schedule", "warmup_epochs", "lr_decay_start_epoch", "weight_decay", "grad_clip", "seed", "bf16",
    "grad_checkpointing", "group_sizes_list", "log_freq",
)


def _int_list(text: str) -> list[int]:
    return [int(t) for t in str(text).replace("[", "").replace("]", "").split(",") if t.strip()]


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).replace("[", "").replace("]", "").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m lpd.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file of defaults (flags override it)")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    # model / tokenizer
    p.add_argument("--model", default=None, help="a preset name, or none: model_config alone")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--model_config", type=yaml_mapping, default=None)
    p.add_argument("--tokenizer", default="palette")
    p.add_argument("--vq_config", type=yaml_mapping, default=None)
    # training (lpd.train)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--blr", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--lr_schedule", default="cosine")
    p.add_argument("--warmup_epochs", type=float, default=0.3)
    p.add_argument("--lr_decay_start_epoch", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.02)
    p.add_argument("--grad_clip", type=float, default=3.0)
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--group_sizes_list", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_freq", type=int, default=10)
    p.add_argument("--max_train_samples", type=int, default=0, help="use only the first N training digits (0: all)")
    # judge and ablation
    p.add_argument("--classifier_epochs", type=int, default=10)
    p.add_argument("--orders", type=_str_list, default=["lpd", "random", "raster"])
    p.add_argument("--steps", type=_int_list, default=[8, 12, 20, 32, 256])
    p.add_argument("--num_images", type=int, default=100, help="samples per setting (balanced over the 10 digits)")
    p.add_argument("--eval_bsz", type=int, default=50)
    add_sampling_args(p, SamplingConfig(cfg=5.0, repulsion_threshold=2.0), exclude=("order", "bf16"))
    p.add_argument("--grid_images", type=int, default=40, help="samples shown in each setting's grid PNG")
    p.add_argument("--decode_threads", type=int, default=1,
                   help="torch CPU threads while sampling (0: leave as is); small-batch decoding of a tiny "
                        "model gains nothing from more, and one thread is far faster on a busy machine")
    return p


def _train_config(args: argparse.Namespace, output_dir: str):
    from lpd.train import TrainConfig

    fields = {name: getattr(args, name) for name in _TRAIN_FIELDS}
    return TrainConfig(
        **fields,
        output_dir=output_dir,
        device=str(args.device),
        num_workers=0,
        pin_mem=False,
        save_every_steps=0,
        save_every_epochs=0,
        eval_freq=0,
    )


def _train_or_reuse(args: argparse.Namespace, out: str, device: torch.device, log) -> tuple[torch.nn.Module, float]:
    """Train through lpd.train, or reuse a finished run in ``out/train`` made with the same settings."""
    from lpd.checkpoint import load_checkpoint
    from lpd.demo.digits import DigitTokens
    from lpd.distributed import DistInfo
    from lpd.models import load_lpd
    from lpd.train import train

    train_dir = os.path.join(out, "train")
    config = _train_config(args, train_dir)
    last = os.path.join(train_dir, "checkpoint-last.pth")
    signature = {k: v for k, v in config.to_dict().items() if k in _TRAIN_FIELDS}
    signature["max_train_samples"] = args.max_train_samples
    sig_path = os.path.join(train_dir, "demo_signature.json")
    if os.path.isfile(last):
        ckpt = load_checkpoint(last)
        done = int(ckpt.get("epoch", -1)) + 1 >= args.epochs and int(ckpt.get("step", 0)) >= int(ckpt.get("steps_per_epoch", 1))
        if done and ckpt.get("demo_signature") == signature:
            log(f"reusing the trained model in {train_dir} (delete it to train again)")
            return load_lpd(last).to(device), 0.0
        same = False
        if os.path.isfile(sig_path):
            with open(sig_path, encoding="utf-8") as f:
                same = json.load(f) == json.loads(json.dumps(signature))
        if same and not done:
            config.resume = train_dir  # an interrupted demo run: continue it exactly
            log(f"resuming the interrupted training run in {train_dir}")
        else:
            os.remove(last)  # another configuration: start afresh
    os.makedirs(train_dir, exist_ok=True)
    with open(sig_path, "w", encoding="utf-8") as f:
        json.dump(signature, f)
    dataset = DigitTokens("train", levels=int((args.vq_config or {}).get("levels", 4)))
    if args.max_train_samples:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_train_samples, len(dataset))))
        dataset.num_classes = 10  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    result = train(config, info=DistInfo(0, 1, 0, device), dataset=dataset, log=log)
    seconds = time.perf_counter() - t0
    if result.preempted:
        raise DemoInterrupted(f"training was interrupted and saved in {train_dir}; run the same command again to continue")
    # Mark the run as finished with these settings so a rerun of the demo reuses it.
    from lpd.checkpoint import save_checkpoint

    ckpt = load_checkpoint(last)
    ckpt["demo_signature"] = signature
    save_checkpoint(ckpt, last)
    return result.model.eval(), seconds


def _reference_statistics(clf, levels: int, device: torch.device):
    from lpd.demo.digits import load_digits_images
    from lpd.metrics import compute_statistics

    images, labels = load_digits_images("test", levels=levels, uint8=True)
    return compute_statistics(images, extractor=clf.features, batch_size=128, device=device, progress=False)


def run_demo(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the whole demo; returns the ``metrics.json`` record."""
    from lpd.demo.classifier import train_classifier
    from lpd.demo.digits import load_digits_dataset
    from lpd.evaluate import generate_images
    from lpd.images import save_grid
    from lpd.metrics import compute_statistics, frechet_distance
    from lpd.schedules import group_sizes
    from lpd.tokenizer import make_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.output_dir
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    levels = int((args.vq_config or {}).get("levels", 4))
    for o in args.orders:
        if o not in ("lpd", "random", "raster"):
            raise ValueError(f"--orders: unknown order {o!r}; choose from lpd, random, raster")

    t_start = time.perf_counter()
    log("== 1/3 training LPD on the embedded digits (lpd.train)")
    model, train_seconds = _train_or_reuse(args, out, device, log)
    n_params = sum(p.numel() for p in model.parameters())

    log("== 2/3 training the digit classifier (the judge)")
    clf = train_classifier(seed=args.seed, epochs=args.classifier_epochs, device=device, levels=levels)
    test_tokens, test_labels = load_digits_dataset("test", levels=levels)
    logits = clf.predict_tokens(test_tokens.to(device))
    clf_acc = float((logits.argmax(-1).cpu() == test_labels).float().mean())
    ref = _reference_statistics(clf, levels, device)
    log(f"classifier held-out accuracy: {clf_acc:.3f} ({len(test_labels)} digits)")

    log("== 3/3 ablation: orders x steps, same model and seed (lpd.evaluate + lpd.metrics)")
    tokenizer = make_tokenizer(args.tokenizer, None, args.vq_config, args.seed, device)
    labels = np.arange(args.num_images) % 10
    rows: list[dict[str, Any]] = []
    train_threads = torch.get_num_threads()
    if args.decode_threads and device.type == "cpu":
        torch.set_num_threads(args.decode_threads)
    for order in args.orders:
        for steps in args.steps:
            sizes = group_sizes(args.img_size, steps)
            t0 = time.perf_counter()
            res = generate_images(model, tokenizer, args.num_images, sizes, sampling_from_args(args, order=order),
                                  labels=labels, seed=args.seed, eval_bsz=args.eval_bsz)
            seconds = time.perf_counter() - t0
            images = res.images  # uint8 [n, H, W, 3]
            stats = compute_statistics(images, extractor=clf.features, batch_size=128, device=device, progress=False)
            pred = np.asarray(stats.logits).argmax(-1)
            acc = float((pred == labels).mean())
            fd = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
            rows.append({"order": order, "steps": steps, "accuracy": acc, "frechet": fd, "seconds": seconds})
            grid_path = os.path.join(out, "samples", f"{order}_steps{steps}.png")
            # Labels cycle 0..9, so each row of 10 shows one sample of every digit.
            save_grid(grid_path, list(images[: args.grid_images]), ncol=10, max_tile=64)
            log(f"  {order:>6} {steps:>4} steps: accuracy {acc:.3f}  frechet {fd:8.3f}  {seconds:6.1f} s")

    torch.set_num_threads(train_threads)
    record = {
        "classifier_accuracy": clf_acc,
        "ablation": rows,
        "settings": {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v))
                     for k, v in vars(args).items()},
        "model_parameters": n_params,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    from lpd.checkpoint import atomic_write_bytes

    atomic_write_bytes(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(record, indent=2).encode()))
    _plot(rows, os.path.join(out, "ablation.png"), args)
    log(format_table(record))
    log(f"wrote {os.path.join(out, 'metrics.json')}, {os.path.join(out, 'ablation.png')} and {os.path.join(out, 'samples')}/")
    return record


def _plot(rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    from lpd.plotting import line_chart

    def series(key: str) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            out.setdefault(r["order"], []).append((r["steps"], r[key]))
        return out

    line_chart(
        path,
        [
            {"series": series("accuracy"), "title": "class accuracy of samples (higher is better)", "xlabel": "decoding steps (log)", "ylabel": "accuracy", "log_x": True},
            {"series": series("frechet"), "title": "Frechet distance to held-out digits (lower is better)", "xlabel": "decoding steps (log)", "ylabel": "Frechet", "log_x": True},
            {"series": series("seconds"), "title": f"seconds for {args.num_images} samples", "xlabel": "decoding steps (log)", "ylabel": "seconds", "log_x": True},
        ],
        title=f"LPD digits demo: cfg {args.cfg}, temperature {args.temperature}, seed {args.seed}",
    )


def format_table(record: dict[str, Any]) -> str:
    lines = [
        f"classifier held-out accuracy: {record['classifier_accuracy']:.3f}",
        "",
        "| order | steps | accuracy | Frechet | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in record["ablation"]:
        lines.append(f"| {r['order']} | {r['steps']} | {r['accuracy']:.3f} | {r['frechet']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    try:
        run_demo(args)
    except DemoInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 75
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
