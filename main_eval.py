"""Evaluate an LPD generator: sample the paper's 50,000 images, then FID, IS and speed.

One command per row of the paper's table (spec section 6), on any number of GPUs::

    torchrun --nproc_per_node=8 main_eval.py --config configs/eval_lpd_l_256_20steps.yaml
    torchrun --nproc_per_node=8 main_eval.py --model lpd_l --img_size 256 --generation_steps 20 \\
        --cfg 4.8 --order lpd --repulsion_threshold 2.0 --output_dir out/

The checkpoint (``mit-han-lab/lpd_l_256`` ...) and the tokenizer (``vq_ds16_c2i.pt`` from
``FoundationVision/LlamaGen``) are resolved by name through the Hugging Face cache unless
``--pretrained_ckpt`` / ``--vqgan_path`` are given; the ADM reference statistics through
:func:`lpd.hub.resolve_fid_stats` unless ``--fid_stats`` is.  Checkpoints written by this project
carry their architecture, so ``--pretrained_ckpt`` alone suffices for them.

Writes, in ``OUTPUT_DIR/<run name>/`` (e.g. ``lpd_l-res256-steps20-cfg4.8-lpd-tr2.0-seed0``):
``images/000000.png ...`` (image ``i`` depends only on the seed, ``i`` and the settings: 1 or N
processes give identical files, and a rerun only samples what is missing), ``<run name>.npz``
(ADM format), ``samples_grid.png``, ``settings.json`` and ``metrics.json`` (FID, IS, speed, every
setting, device, versions).  ``--config FILE.yaml`` sets defaults that flags override.

Image ``i`` has class ``floor(i * class_num / num_images)`` (``i // 50`` for 50,000 images), order
``i`` of the run (from ``--seed``, or row ``i`` of ``--lpd_order_file``) and its own noise
generator; see :mod:`lpd.evaluate`.  On a CPU, byte-identical files across process counts also
need the same threads per process: torchrun sets ``OMP_NUM_THREADS=1``, so set it for a single
process too when comparing.  Speed without downloads: ``--random_init --vq_config '{}'`` (the
released architectures with weights drawn from ``--seed``).

Smoke test on a CPU::

    python main_eval.py --config configs/tiny.yaml --random_init --num_images 20 --eval_bsz 5 \\
        --generation_steps 20 --order lpd --cfg 2.0 --seed 0 --no_fid --output_dir /tmp/eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import torch

from lpd.checkpoint import CheckpointError
from lpd.config import ConfigError, parse_args_with_config
from lpd.distributed import cleanup, init_distributed
from lpd.evaluate import (
    ORDER_CHOICES,
    EvaluationError,
    evaluate,
    load_model,
    load_order_table,
    load_tokenizer,
    pixel_settings,
    rank0_first,
    run_name,
)
from lpd.sampling import check_sampling_args
from lpd.schedules import GroupSizeError, group_sizes as default_group_sizes, parse_group_sizes


def _json_mapping(text: str) -> dict[str, Any]:
    """``--model_config '{"embed_dim": 64}'`` (YAML configs give the mapping directly)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as '{\"embed_dim\": 64}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (keys are these flag names)")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--model", default=None, help="preset: lpd_l, lpd_xl, lpd_xxl (released checkpoints), lpd_tiny")
    g.add_argument("--img_size", type=int, default=None, help="256 or 512 (default: the checkpoint's, else 256)")
    g.add_argument("--pretrained_ckpt", default=None, help="checkpoint file (default: the released one, from the Hub)")
    g.add_argument("--random_init", action="store_true",
                   help="weights drawn from --seed instead of a checkpoint (speed and smoke tests)")
    g.add_argument("--model_config", type=_json_mapping, default=None, help="build_lpd overrides (JSON / YAML mapping)")
    g.add_argument("--tokenizer", choices=["vq", "palette"], default="vq")
    g.add_argument("--vqgan_path", default=None, help="vq_ds16_c2i.pt (default: from FoundationVision/LlamaGen)")
    g.add_argument("--vq_config", type=_json_mapping, default=None,
                   help="tokenizer architecture (JSON / YAML mapping); without --vqgan_path: weights from --seed")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_images", type=int, default=50000)
    g.add_argument("--eval_bsz", type=int, default=64, help="images per forward pass and process")
    g.add_argument("--generation_steps", type=int, default=20)
    g.add_argument("--group_sizes", default=None, help="explicit schedule, e.g. '[1, 2, 4]' or '[1]*256'")
    g.add_argument("--order", choices=list(ORDER_CHOICES), default="lpd")
    g.add_argument("--lpd_order_file", default=None, help="JSON order file (default: orders generated from --seed)")
    g.add_argument("--proximity_threshold", type=float, default=1.0)
    g.add_argument("--repulsion_threshold", type=float, default=1.0)
    g.add_argument("--cfg", type=float, default=1.0)
    g.add_argument("--cfg_schedule", default="linear", help="linear or constant")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for the transformer (the paper's configs turn it on, as the released "
                        "evaluation scripts do; --no-bf16 turns it off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("outputs and metrics")
    g.add_argument("--output_dir", default="outputs/eval", help="the run folder is created inside it")
    g.add_argument("--run_name", default=None, help="run folder name (default: built from the settings)")
    g.add_argument("--no_fid", action="store_true", help="sample and time only; no FID / IS")
    g.add_argument("--fid_stats", default=None, help="reference statistics .npz (default: adm_in{img_size}_stats.npz)")
    g.add_argument("--inception_weights", default=None, help="torch-fidelity Inception weights (offline machines)")
    g.add_argument("--metrics_bsz", type=int, default=50, help="images per Inception batch")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no_progress", action="store_true")
    g = p.add_argument_group("released flags accepted for compatibility")
    g.add_argument("--evaluate", action="store_true", help="accepted (this script only evaluates)")
    g.add_argument("--vqgan_stride", type=int, default=None, help="must be 16 (the LlamaGen VQ)")
    for name in ("--world_size", "--local_rank", "--local-rank", "--dist_url"):  # torchrun's environment rules
        g.add_argument(name, default=None, help=argparse.SUPPRESS)
    g.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Errors that need no file and no device: raised before anything is loaded."""
    check_sampling_args(args.cfg, args.cfg_schedule, args.temperature, args.top_k, args.top_p)
    for name in ("num_images", "eval_bsz", "generation_steps", "metrics_bsz"):
        v = getattr(args, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise EvaluationError(f"--{name} must be a positive integer, got {v!r}")
    if args.lpd_order_file and args.order != "lpd":
        raise EvaluationError(f"--lpd_order_file gives LPD orders; it cannot be combined with --order {args.order}")
    if getattr(args, "vqgan_stride", None) not in (None, 16):
        raise EvaluationError(f"--vqgan_stride {args.vqgan_stride}: only the 16x-downsampling LlamaGen VQ is supported")
    if args.random_init and args.pretrained_ckpt:
        raise EvaluationError("--random_init and --pretrained_ckpt exclude each other")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate with parsed arguments; returns the metrics record (on every rank)."""
    check_args(args)
    dist_info = init_distributed(args.device)
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    if device.type == "cuda":  # same kernels for every run of a setting: byte-identical images
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        model, weights = load_model(model=args.model, img_size=args.img_size, pretrained_ckpt=args.pretrained_ckpt,
                                    random_init=args.random_init, model_config=args.model_config, seed=args.seed,
                                    device=device, rank=rank, world_size=world)
        cfg = model.config
        img_size, grid = cfg.img_size, cfg.grid_size
        if args.group_sizes:
            sizes = parse_group_sizes(args.group_sizes, grid * grid)
            if len(sizes) != args.generation_steps and "generation_steps" in _given(argv):
                raise EvaluationError(f"--group_sizes has {len(sizes)} steps but --generation_steps is {args.generation_steps}")
        else:
            sizes = default_group_sizes(img_size, args.generation_steps, cfg.vqgan_stride)
        fid_stats = None
        if not args.no_fid:
            from lpd import hub

            fid_stats = rank0_first(lambda: hub.resolve_fid_stats(img_size, path=args.fid_stats), rank, world)
        table = load_order_table(args.lpd_order_file, args.num_images, grid) if args.lpd_order_file else None
        tokenizer, tok_label = load_tokenizer(kind=args.tokenizer, vqgan_path=args.vqgan_path, vq_config=args.vq_config,
                                              seed=args.seed, device=device, rank=rank, world_size=world)
        name = args.model or (os.path.splitext(weights)[0] if not args.random_init else "lpd")
        settings = pixel_settings(
            model=name, img_size=img_size, num_images=args.num_images, group_sizes=sizes, order=args.order,
            seed=args.seed, cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, proximity_threshold=args.proximity_threshold,
            repulsion_threshold=args.repulsion_threshold, order_file=args.lpd_order_file, bf16=args.bf16,
            weights=weights, tokenizer=tok_label)
        settings["custom_group_sizes"] = bool(args.group_sizes)
        run_dir = os.path.join(args.output_dir, args.run_name or run_name(settings))
        if rank == 0:
            print(f"run folder: {run_dir}", flush=True)
        record = evaluate(
            model, tokenizer, args.num_images, sizes, output_dir=run_dir, settings=settings,
            compute_fid=not args.no_fid, ref_stats=fid_stats, inception_weights=args.inception_weights,
            metrics_batch_size=args.metrics_bsz, rank=rank, world_size=world, progress=not args.no_progress,
            info={"command": ["main_eval.py"] + list(sys.argv[1:] if argv is None else argv),
                  "args": {k: v for k, v in vars(args).items()}},
            order=args.order, orders=table, proximity_threshold=args.proximity_threshold,
            repulsion_threshold=args.repulsion_threshold, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            eval_bsz=args.eval_bsz, bf16=args.bf16)
        if rank == 0:
            print(summary(record), flush=True)
        return record
    finally:
        cleanup()


def _given(argv: Sequence[str] | None) -> set[str]:
    """Flag names given on the command line (not from the config file)."""
    items = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=", 1)[0] for a in items if a.startswith("--")}


def summary(record: dict[str, Any]) -> str:
    """A few lines for the terminal: scores, speed, where the files are."""
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    sp = record["speed"]
    lines = [
        f"images: {record['num_images']} ({record['generated_this_run']} sampled now, "
        f"{record['found_on_disk']} found on disk)",
        f"FID {num(record.get('fid'), '.4f')}   IS {num(record.get('inception_score'), '.2f')}",
    ]
    for key, label in (("tokens", "tokens only"), ("tokens_and_decode", "tokens + VQ decoding")):
        r = sp[key]
        lines.append(f"speed ({label}, per process, batch {sp['eval_bsz']}): {num(r['images_per_s'], '.3f')} images/s, "
                     f"{num(r['s_per_image'], '.4f')} s/image, {num(r['s_per_batch'], '.3f')} s/batch")
    if sp.get("total_images_per_s") and sp["processes"] > 1:
        lines.append(f"all {sp['processes']} processes: {sp['total_images_per_s']['tokens_and_decode']:.3f} images/s")
    lines.append(f"device: {record['device']}, dtype {record['dtype']}")
    files = record.get("files", {})
    if files.get("metrics"):
        lines.append(f"wrote {files['metrics']}, {files.get('npz')}, {files.get('grid')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args_with_config(build_parser(), argv)
    return run(args, argv)


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, ConfigError, CheckpointError, GroupSizeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
