"""Evaluate an LPD generator: sample the paper's 50,000 images, then FID, IS and speed.

    torchrun --nproc_per_node=8 main_eval.py --config configs/eval_lpd_l_256_20steps.yaml
    torchrun --nproc_per_node=8 main_eval.py --model lpd_l --img_size 256 --generation_steps 20 \\
        --cfg 4.8 --order lpd --repulsion_threshold 2.0 --output_dir out/
    python main_eval.py --config configs/tiny.yaml --random_init --num_images 20 --eval_bsz 5 --no_fid --output_dir /tmp/eval
    python main_eval.py --pretrained_ckpt t2i/checkpoint-last.pth --prompts prompts.txt \\
        --fid_stats coco_stats.npz --clip_model openai/clip-vit-large-patch14 --num_images 30000

The checkpoint (``mit-han-lab/lpd_l_256`` ...), the tokenizer (``vq_ds16_c2i.pt``) and the ADM
statistics are resolved through the Hugging Face cache unless ``--pretrained_ckpt`` /
``--vqgan_path`` / ``--fid_stats`` name files. Writes ``OUTPUT_DIR/<run name>/`` with
``images/*.png``, ``tokens.npy``, ``<run name>.npz`` (ADM), ``samples_grid.png``,
``settings.json`` and ``metrics.json``; a rerun samples only what is missing and refuses a folder
of other inputs. A text-to-image model samples image ``i`` from prompt ``i`` of ``--prompts``
(cycled); ``--clip_model`` adds its CLIPScore. ``--config FILE.yaml`` sets defaults that flags
override.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lpd import hub, metrics
from lpd.config import (
    ConfigError,
    HelpFormatter,
    check_positive,
    check_run_name,
    check_seed,
    parse_args_with_config,
    yaml_mapping,
)
from lpd.distributed import RankError, cleanup, init_distributed, on_rank0, rank0_first
from lpd.evaluate import RunSpec, Scoring, evaluate
from lpd.files import CheckpointError
from lpd.orders import load_orders
from lpd.pipeline import add_paper_sampling_args, paper_settings
from lpd.sampling import SamplingConfig, sampling_from_args
from lpd.schedules import group_sizes as default_group_sizes
from lpd.schedules import parse_group_sizes
from lpd.text.clipscore import CLIPScorer, score_run
from lpd.text.encoders import check_encoder_record, make_text_encoder
from lpd.text.prompts import PromptSet, prompt_of, read_prompts
from lpd.text.sampling import model_text_encoder
from lpd.tokenizer import make_tokenizer

USER_ERRORS = (
    ValueError,
    OSError,
    CheckpointError,
    RankError,
)  # every error lpd raises for bad input


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config", default=None, help="YAML file of defaults (keys are these flag names)"
    )
    g = p.add_argument_group("model and tokenizer")
    g.add_argument(
        "--model",
        default=None,
        help="preset: lpd_l, lpd_xl, lpd_xxl (released checkpoints), lpd_tiny",
    )
    g.add_argument(
        "--img_size",
        type=int,
        default=None,
        help="256 or 512 (default: the checkpoint's, else 256)",
    )
    g.add_argument(
        "--pretrained_ckpt",
        default=None,
        help="checkpoint file or folder, exported model folder or Hub "
        "repository (default: the released checkpoint of --model, from the Hub)",
    )
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="the EMA weights of a checkpoint trained with --ema_decay",
    )
    g.add_argument(
        "--random_init",
        action="store_true",
        help="weights drawn from --seed instead of a checkpoint",
    )
    g.add_argument(
        "--model_config", type=yaml_mapping, default=None, help="LPDConfig fields (YAML mapping)"
    )
    g.add_argument("--tokenizer", choices=["vq", "palette"], default="vq")
    g.add_argument(
        "--vqgan_path",
        default=None,
        help="vq_ds16_c2i.pt (default: from FoundationVision/LlamaGen)",
    )
    g.add_argument(
        "--vq_config",
        type=yaml_mapping,
        default=None,
        help="VQ architecture; without --vqgan_path: weights from --seed",
    )
    g = p.add_argument_group("images")
    g.add_argument("--num_images", type=int, default=50000)
    g.add_argument("--eval_bsz", type=int, default=64, help="images per forward pass and process")
    g.add_argument("--generation_steps", type=int, default=20)
    g.add_argument(
        "--group_sizes", default=None, help="explicit schedule, e.g. '[1, 2, 4]' or '[1]*256'"
    )
    g.add_argument(
        "--lpd_order_file",
        default=None,
        help="JSON order file (default: orders generated from --seed)",
    )
    g.add_argument("--seed", type=int, default=0)
    add_paper_sampling_args(
        p, {k: f"else {getattr(SamplingConfig(), k)}" for k in ("cfg", "repulsion_threshold")}
    )
    g = p.add_argument_group("outputs and metrics")
    g.add_argument(
        "--output_dir", default="outputs/eval", help="the run folder is created inside it"
    )
    g.add_argument(
        "--run_name", default=None, help="run folder name (default: built from the settings)"
    )
    g.add_argument("--no_fid", action="store_true", help="sample and time only; no FID / IS")
    g.add_argument(
        "--fid_stats",
        default=None,
        help="reference statistics .npz (default: adm_in{img_size}_stats.npz)",
    )
    g.add_argument(
        "--inception_weights",
        default=None,
        help="torch-fidelity Inception weights (offline machines)",
    )
    g.add_argument("--metrics_bsz", type=int, default=50, help="images per Inception batch")
    g.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    g.add_argument("--no_progress", action="store_true")
    g = p.add_argument_group("text-to-image models")
    g.add_argument(
        "--prompts",
        default=None,
        help="prompt file: one per line, or .jsonl with a caption per line (image i: prompt i, "
        "cycled); FID needs --fid_stats of real images",
    )
    g.add_argument(
        "--text_encoder",
        default=None,
        help="wordllama or a Hugging Face name or folder (default: the one the checkpoint records)",
    )
    g.add_argument(
        "--clip_model",
        default=None,
        help="CLIPScore (100 * max(cos, 0)) with this CLIP: a Hugging Face name or folder, or "
        "open_clip:ARCH/PRETRAINED",
    )
    g = p.add_argument_group("released flags accepted for compatibility")
    g.add_argument("--evaluate", action="store_true", help="accepted (this script only evaluates)")
    g.add_argument("--vqgan_stride", type=int, default=None, help="must be 16 (the LlamaGen VQ)")
    for name in (
        "--world_size",
        "--local_rank",
        "--local-rank",
        "--dist_url",
    ):  # torchrun's environment rules
        g.add_argument(name, default=None, help=argparse.SUPPRESS)
    g.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags over ``--config``; its main_train.py keys (configs/tiny.yaml's lr ...) are ignored."""
    from main_train import get_args_parser as train_parser

    return parse_args_with_config(build_parser(), argv, also_known=train_parser())


def sampling_for(args: argparse.Namespace, img_size: int, steps: int) -> SamplingConfig:
    """The sampling flags; cfg and τr not given: the paper's for --model, size and steps, else the
    defaults of :class:`SamplingConfig`."""
    default = (SamplingConfig.repulsion_threshold, SamplingConfig.cfg)
    tr, cfg = paper_settings(args.model, img_size, steps) or default
    unset = {
        k: v for k, v in (("cfg", cfg), ("repulsion_threshold", tr)) if getattr(args, k) is None
    }
    return sampling_from_args(args, **unset)


def check_args(
    args: argparse.Namespace, argv: Sequence[str] | None
) -> tuple[SamplingConfig, list[int] | None]:
    """Everything that needs no file and no device, before anything is loaded."""
    sampling = sampling_for(args, args.img_size or 256, args.generation_steps)
    for name in ("num_images", "eval_bsz", "generation_steps", "metrics_bsz") + (
        ("img_size",) if args.img_size is not None else ()
    ):
        check_positive(getattr(args, name), f"--{name}")
    check_seed(args.seed)
    if args.run_name is not None:
        check_run_name(args.run_name)
    if args.lpd_order_file and args.order != "lpd":
        raise ConfigError(
            f"--lpd_order_file gives LPD orders; it cannot be combined with --order {args.order}"
        )
    if args.vqgan_stride not in (None, 16):
        raise ConfigError(
            f"--vqgan_stride {args.vqgan_stride}: only the 16x-downsampling LlamaGen VQ is supported"
        )
    if args.random_init and args.pretrained_ckpt:
        raise ConfigError("--random_init and --pretrained_ckpt exclude each other")
    if args.use_ema and not args.pretrained_ckpt:
        raise ConfigError("--use_ema takes the EMA weights of a checkpoint: give --pretrained_ckpt")
    if not (args.random_init or args.pretrained_ckpt or args.model):
        raise ConfigError(
            "no model: pass --model (lpd_l, lpd_xl, lpd_xxl) for a released checkpoint, --pretrained_ckpt FILE, or --random_init"
        )
    for flag in ("text_encoder", "clip_model"):
        if getattr(args, flag) and not args.prompts:
            raise ConfigError(f"--{flag} is for text-to-image models: give --prompts FILE too")
    if args.prompts and not (args.no_fid or args.fid_stats):
        raise ConfigError(
            "--prompts: FID needs the statistics of real images for these prompts: give "
            "--fid_stats FILE.npz (python -m lpd.metrics stats --input FOLDER --output FILE.npz) "
            "or --no_fid"
        )
    sizes = None
    if args.group_sizes:
        sizes = parse_group_sizes(args.group_sizes)
        given = {
            a[2:].split("=", 1)[0]
            for a in (sys.argv[1:] if argv is None else argv)
            if a.startswith("--")
        }
        if "generation_steps" in given and len(sizes) != args.generation_steps:
            raise ConfigError(
                f"--group_sizes has {len(sizes)} steps but --generation_steps is {args.generation_steps}"
            )
    return sampling, sizes


def needed_files(args: argparse.Namespace) -> dict[str, str]:
    """Every file the run reads, found or fetched together: one error names all that are missing,
    before any work (the ADM statistics of a checkpoint of unknown size: once it is loaded)."""
    size = args.img_size or (None if args.pretrained_ckpt else 256)
    more = {}
    if args.lpd_order_file:
        more["order file"] = lambda: hub.local_file(
            args.lpd_order_file, what="order file", flag="--lpd_order_file"
        )
    if not args.no_fid and size:
        more["ADM statistics"] = lambda: hub.resolve_fid_stats(size, path=args.fid_stats)
    elif not args.no_fid and args.fid_stats:
        more["ADM statistics"] = lambda: hub.local_file(
            args.fid_stats, what="FID statistics", flag="--fid_stats"
        )
    if not args.no_fid:
        more["Inception weights"] = lambda: metrics.resolve_inception_weights(
            args.inception_weights
        )
    vq = args.tokenizer == "vq" and (args.vqgan_path or args.vq_config is None)
    return hub.resolve_model_files(
        args.model,
        size or 256,
        checkpoint=args.pretrained_ckpt,
        released=not args.random_init,
        vq=vq,
        vqgan_path=args.vqgan_path,
        more=more,
    )


def load_model(
    args: argparse.Namespace, device: torch.device, path: str | None = None
) -> tuple[torch.nn.Module, str]:
    """The model the flags ask for (``path``: its checkpoint, found already), on ``device``, and its
    run's name."""
    from lpd.models import LPD, LPDConfig, load_lpd

    overrides = dict(args.model_config or {})
    if args.random_init:
        net = LPD(LPDConfig.from_name(args.model, args.img_size or 256, **overrides))
        net.initialize_weights(torch.Generator().manual_seed(args.seed))
        return net.to(device).eval(), f"{args.model or 'lpd'}-randinit"
    from lpd import hub

    if path is None:
        path = rank0_first(
            lambda: hub.resolve_model_files(
                args.model, args.img_size or 256, checkpoint=args.pretrained_ckpt, vq=False
            )
        )
        path = path["checkpoint"]
    net = load_lpd(
        path,
        model=args.model,
        img_size=args.img_size,
        overrides=overrides or None,
        ema=args.use_ema,
    )
    name = (
        args.model or os.path.splitext(os.path.basename(os.path.normpath(args.pretrained_ckpt)))[0]
    )
    return net.to(device), name + ("-ema" if args.use_ema else "")


def text_prompts(
    args: argparse.Namespace, model: torch.nn.Module, device: torch.device, read: tuple | None
) -> PromptSet | None:
    """The prompts of a text model (``read``: :func:`read_prompts` of ``--prompts``; None for a
    class model), with its text encoder."""
    text = model.config.condition == "text"
    if text != bool(args.prompts):
        raise ConfigError(
            "the model is text-to-image: give --prompts FILE (one prompt per line, or JSONL with "
            '"caption")'
            if text
            else "--prompts is for text-to-image models; this model is class-conditional"
        )
    if not text:
        return None
    record = model.config.text_encoder
    if not (args.text_encoder or record):
        raise ConfigError(
            "--text_encoder: the model records no text encoder (random weights); give "
            "--text_encoder wordllama or a Hugging Face name or folder"
        )
    file = os.path.basename(args.prompts)
    if not args.text_encoder:
        return PromptSet(*read, file, model_text_encoder(model, device))
    limit = model.config.max_text_tokens
    encoder = make_text_encoder(args.text_encoder, device, max_text_tokens=limit)
    if record:
        check_encoder_record(record, encoder, "the checkpoint")
    if encoder.width != model.config.text_dim:
        raise ConfigError(
            f"--text_encoder: {encoder.name!r} gives {encoder.width}-d features, the model "
            f"takes {model.config.text_dim}-d ones"
        )
    return PromptSet(*read, file, encoder)


def _fmt(v: float) -> str:
    return f"{v:.1f}" if float(v).is_integer() else f"{v:g}"


def run_name(
    name: str,
    img_size: int,
    sizes: list[int],
    s: SamplingConfig,
    seed: int,
    num_images: int,
    order_file: str | None,
    custom_sizes: bool,
) -> str:
    """E.g. ``lpd_l-res256-steps20-cfg4.8-lpd-tr2.0-seed0``; settings off their defaults are appended."""
    d = SamplingConfig()
    parts = [name, f"res{img_size}", f"steps{len(sizes)}", f"cfg{_fmt(s.cfg)}"]
    parts += ["cfgconst"] if s.cfg_schedule != d.cfg_schedule else []
    parts.append(s.order)
    if order_file:
        parts.append("file" + os.path.splitext(os.path.basename(order_file))[0])
    elif s.order == "lpd":
        parts.append(f"tr{_fmt(s.repulsion_threshold)}")
        parts += (
            [f"tp{_fmt(s.proximity_threshold)}"]
            if s.proximity_threshold != d.proximity_threshold
            else []
        )
    if custom_sizes:
        parts.append("gs" + hashlib.blake2b(json.dumps(sizes).encode(), digest_size=3).hexdigest())
    parts += [f"temp{_fmt(s.temperature)}"] if s.temperature != d.temperature else []
    parts += [f"topk{s.top_k}"] if s.top_k else []
    parts += [f"topp{_fmt(s.top_p)}"] if s.top_p != d.top_p else []
    parts += ["bf16"] if s.bf16 else []
    parts += ["vqfp32"] if s.bf16 and s.decode_fp32 else []
    parts += [f"n{num_images}"] if num_images != 50000 else []
    parts.append(f"seed{seed}")
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in "-".join(parts))


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate with parsed arguments; returns the metrics record (on every rank)."""
    sampling, sizes = check_args(args, argv)
    read = read_prompts(args.prompts) if args.prompts else None  # before anything is loaded
    dist_info = init_distributed(args.device)
    device = dist_info.device
    if device.type == "cuda":  # the same kernels for every run of a setting
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        files = rank0_first(lambda: needed_files(args))
        model, name = load_model(args, device, files.get("checkpoint"))
        prompts = text_prompts(args, model, device, read)
        clip = args.clip_model and on_rank0(
            lambda: CLIPScorer(args.clip_model, device), "loading --clip_model", broadcast=False
        )
        if prompts:
            name += "-" + os.path.splitext(prompts.file)[0]
        img_size, grid = model.config.img_size, model.config.grid_size
        sizes = (
            parse_group_sizes(sizes, grid * grid)
            if sizes
            else default_group_sizes(img_size, args.generation_steps)
        )
        sampling = sampling_for(args, img_size, len(sizes))
        paper = paper_settings(args.model, img_size, len(sizes))
        if dist_info.is_main and paper and None in (args.cfg, args.repulsion_threshold):
            print(
                f"cfg {sampling.cfg:g}, τr {sampling.repulsion_threshold:g}: the paper's for "
                f"{args.model} at {img_size} px, {len(sizes)} steps (--cfg and "
                f"--repulsion_threshold change them)",
                flush=True,
            )
        fid_stats = (
            None
            if args.no_fid
            else files.get("ADM statistics")
            or rank0_first(lambda: hub.resolve_fid_stats(img_size, path=args.fid_stats))
        )
        table = (
            load_orders(args.lpd_order_file, args.num_images, grid) if args.lpd_order_file else None
        )
        vq_path = files.get("VQ tokenizer", args.vqgan_path)
        tokenizer = make_tokenizer(args.tokenizer, vq_path, args.vq_config, args.seed, device)
        run_dir = os.path.join(
            args.output_dir,
            args.run_name
            or run_name(
                name,
                img_size,
                sizes,
                sampling,
                args.seed,
                args.num_images,
                args.lpd_order_file,
                bool(args.group_sizes),
            ),
        )
        if dist_info.is_main:
            print(f"run folder: {run_dir}", flush=True)
        spec = RunSpec(
            args.num_images,
            sizes,
            labels=prompts,
            orders=table,
            order_file=args.lpd_order_file,
            seed=args.seed,
            eval_bsz=args.eval_bsz,
        )
        inception = files.get("Inception weights", args.inception_weights)
        scoring = None if args.no_fid else Scoring(fid_stats, None, inception, args.metrics_bsz)
        command = ["main_eval.py", *(sys.argv[1:] if argv is None else argv)]
        record = evaluate(
            model,
            tokenizer,
            spec,
            sampling,
            output_dir=run_dir,
            name=name,
            scoring=scoring,
            progress=not args.no_progress,
            info={
                "command": command,
                "args": vars(args),
                **({"prompts_truncated": prompts.truncated} if prompts else {}),
            },
        )
        if args.clip_model:  # every rank: on_rank0 is collective
            texts = [prompt_of(prompts.texts, i) for i in range(args.num_images)]
            record = on_rank0(lambda: score_run(record, clip, texts, args.metrics_bsz), "CLIPScore")
        if dist_info.is_main:
            print(summary(record), flush=True)
        return record
    finally:
        cleanup()


def summary(record: dict[str, Any]) -> str:
    """A few lines for the terminal: scores, speed, where the files are."""

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    sp = record["speed"]
    lines = [
        f"images: {record['num_images']} ({record['generated_this_run']} sampled now, {record['found_on_disk']} found on disk)",
        f"FID {num(record.get('fid'), '.4f')}   IS {num(record.get('inception_score'), '.2f')}",
    ]
    if "clip_score_w100" in record:
        lines.append(f"CLIPScore (100 * max(cos, 0)) {num(record['clip_score_w100'], '.2f')}")
    for key, label in (("tokens", "tokens only"), ("tokens_and_decode", "tokens + VQ decoding")):
        r = sp[key]
        lines.append(
            f"speed ({label}, per process): {num(r['images_per_s'], '.3f')} images/s, {num(r['s_per_image'], '.4f')} s/image"
        )
    if sp["processes"] > 1 and sp["total_images_per_s"]["tokens_and_decode"]:
        lines.append(
            f"all {sp['processes']} processes: {sp['total_images_per_s']['tokens_and_decode']:.3f} images/s"
        )
    lines.append(f"device: {record['device']}, dtype {record['dtype']}")
    if record["files"].get("metrics"):
        lines.append(
            f"wrote {record['files']['metrics']}, {record['files']['npz']}, {record['files']['grid']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one ``error:`` line and return 2."""
    try:
        run(parse_args(argv), argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
