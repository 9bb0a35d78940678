"""Train an LPD model (the released recipe) on one process, under torchrun, or through scripts/slurm.py.

    # smoke test on a CPU, from a token cache written by main_cache.py
    torchrun --nproc_per_node=2 main_train.py --config configs/tiny.yaml --use_cached \\
        --cached_path cache/ --epochs 3 --batch_size 4 --save_every_steps 2 --output_dir out/
    # LPD-L at 256 px on 32 GPUs (see scripts/train/ and configs/train_*.yaml)
    torchrun --nnodes 4 --nproc_per_node 8 ... main_train.py --config configs/train_lpd_l_256.yaml \\
        --cached_path CACHE --output_dir outputs/lpd_l_256 --auto_resume

Writes to ``--output_dir``: ``checkpoint-last.pth`` (every ``--save_every_steps`` steps, at epoch ends, on
SIGTERM / SIGUSR1), ``checkpoint-{epoch}.pth`` every ``--save_every_epochs`` epochs (``--fsdp``: folders of
shards), ``log.txt`` (JSON lines), ``config.yaml``, TensorBoard events, and ``train.lock`` while
it runs (a second training into the folder is refused). ``--resume DIR`` continues exactly where
the run stopped; exit status 75: "stopped by a preemption signal after saving; resume me"; 2: a
user error (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lpd.config import HelpFormatter, parse_args_with_config, yaml_mapping
from lpd.distributed import (
    RankError,
    barrier,
    cleanup,
    exit_process,
    init_distributed,
    launch_env,
    lost_peer,
    report_error,
)
from lpd.files import CheckpointError
from lpd.recipe import LR_SCHEDULES
from lpd.sampling import SamplingConfig, add_sampling_args, sampling_from_args
from lpd.train import PREEMPTED_EXIT_CODE, NonFiniteLossError, TrainConfig, train

ONLINE_EVAL_FREQ = 50  # the released --eval_freq default, for --online_eval without --eval_freq


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        "LPD training", allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML file of defaults (flag names as keys); flags override it",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="preset: lpd_l, lpd_xl, lpd_xxl, lpd_tiny")
    g.add_argument(
        "--img_size", type=int, default=d.img_size, help="image size in pixels (256 or 512)"
    )
    g.add_argument(
        "--model_config",
        type=yaml_mapping,
        default=None,
        help="build_lpd kwargs overriding the preset (YAML mapping)",
    )
    g.add_argument(
        "--label_drop_prob",
        type=float,
        default=None,
        help="label (or caption) dropout (default: the model's, 0.1)",
    )
    g.add_argument(
        "--attn_dropout",
        type=float,
        default=None,
        help="accepted for the released flags (attention probabilities are not dropped)",
    )
    g.add_argument(
        "--proj_dropout",
        type=float,
        default=None,
        help="dropout after attention projection and in the MLP (default 0.1)",
    )
    g.add_argument(
        "--grad_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute block activations in backward",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=["vq", "palette"])
    g.add_argument(
        "--vqgan_path",
        default=d.vqgan_path,
        help="VQ checkpoint (vq_ds16_c2i.pt); images are encoded on the fly",
    )
    g.add_argument(
        "--vq_config",
        type=yaml_mapping,
        default=None,
        help="VQ architecture (without --vqgan_path: random test VQ)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--use_cached",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train from a token cache (main_cache.py)",
    )
    g.add_argument(
        "--cached_path",
        default=d.cached_path,
        help="token cache folder (released or consolidated layout)",
    )
    g.add_argument(
        "--cache_format", default=d.cache_format, choices=["auto", "released", "consolidated"]
    )
    g.add_argument(
        "--data_path",
        default=d.data_path,
        help="ImageFolder (or a folder with train/) when not cached; a text model: webdataset "
        ".tar shards (a .tar, a folder of them or a pattern like a-{000..009}.tar), streamed",
    )
    g.add_argument(
        "--text_encoder",
        default=d.text_encoder,
        help="streamed captions: 'wordllama' or a Hugging Face encoder name or folder "
        "(a caption cache records its own)",
    )
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument(
        "--pin_mem",
        type=_bool,
        nargs="?",
        const=True,
        default=d.pin_mem,
        help="pin host memory for GPU copies (--pin_mem, --pin_mem false, or --no_pin_mem)",
    )
    g.add_argument("--no_pin_mem", dest="pin_mem", action="store_false", help=argparse.SUPPRESS)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument(
        "--batch_size",
        type=int,
        default=d.batch_size,
        help="per process; global = batch_size x world size",
    )
    g.add_argument(
        "--blr", type=float, default=d.blr, help="base lr: lr = blr x global batch / 256"
    )
    g.add_argument("--lr", type=float, default=d.lr, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=d.min_lr)
    g.add_argument("--lr_schedule", default=d.lr_schedule, choices=list(LR_SCHEDULES))
    g.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs)
    g.add_argument(
        "--lr_decay_start_epoch",
        type=float,
        default=d.lr_decay_start_epoch,
        help="constant+cosine: cosine from here",
    )
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--grad_clip", type=float, default=d.grad_clip, help="max gradient norm (0: no clipping)"
    )
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 autocast (GPU; also works on a CPU)",
    )
    g.add_argument(
        "--group_sizes_list",
        default=d.group_sizes_list,
        help="schedules separated by ';' (e.g. '[1]*256; [1*41, 2*46, 3*41]') or a YAML file of them; "
        "default: the released tables of --img_size",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda (cuda gets the local rank)")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2 instead of DDP: weights, gradients and AdamW state sharded "
        "over the processes; checkpoints become folders of shards (python -m lpd.checkpoint consolidate)",
    )
    g.add_argument(
        "--cpu_offload",
        action="store_true",
        help="with --fsdp on GPUs: keep the shards and AdamW state in CPU memory",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        default=d.ema_decay,
        help="keep an fp32 EMA of the weights (e.g. 0.9999; 0: none; default: a resumed "
        "run's, else none)",
    )
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument(
        "--log_dir", default=d.log_dir, help="TensorBoard folder (default: --output_dir)"
    )
    g.add_argument(
        "--resume",
        default=d.resume,
        help="checkpoint, or an output folder with checkpoint-last.pth (--fsdp: checkpoint-last/)",
    )
    g.add_argument(
        "--auto_resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="resume from OUTPUT_DIR/checkpoint-last.pth (--fsdp: checkpoint-last/) when it exists",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="train into an --output_dir that holds another run's checkpoints",
    )
    g.add_argument(
        "--pretrained_ckpt",
        default=d.pretrained_ckpt,
        help="initial weights (e.g. the 256 px model for 512 px fine-tuning; pos_embed is interpolated)",
    )
    g.add_argument(
        "--save_every_steps",
        type=int,
        default=d.save_every_steps,
        help="checkpoint-last.pth every N steps (0: off)",
    )
    g.add_argument(
        "--save_every_epochs",
        "--save_intermediate_freq",
        type=int,
        default=d.save_every_epochs,
        help="checkpoint-{epoch}.pth every K epochs (released name: --save_intermediate_freq)",
    )
    g.add_argument(
        "--save_last_freq",
        type=int,
        default=d.save_last_freq,
        help="checkpoint-last.pth at the end of every K-th epoch (released flag; the step-wise "
        "--save_every_steps saves and preemption saves come on top)",
    )
    g.add_argument("--log_freq", type=int, default=d.log_freq, help="log every N steps")
    g.add_argument(
        "--wandb",
        "--use_wandb",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="log to Weights & Biases (when installed)",
    )
    g.add_argument("--wandb_project", default=d.wandb_project)
    g.add_argument("--run_name", "--wandb_run_name", default=d.run_name)
    g.add_argument(
        "--preempt_signals",
        default=d.preempt_signals,
        help="signals that save and stop (comma-separated)",
    )
    g = p.add_argument_group("evaluation during training (lpd.evaluate)")
    g.add_argument(
        "--eval_freq",
        type=int,
        default=d.eval_freq,
        help=f"evaluate every N epochs (0: never, unless --online_eval: then every {ONLINE_EVAL_FREQ})",
    )
    g.add_argument(
        "--online_eval", action="store_true", help="evaluate during training (released flag)"
    )
    g.add_argument("--eval_num_images", "--num_images", type=int, default=d.eval_num_images)
    g.add_argument("--eval_bsz", type=int, default=d.eval_bsz)
    g.add_argument(
        "--eval_steps",
        "--generation_steps",
        type=int,
        default=d.eval_steps,
        help="decoding steps (the released group-size table of --img_size)",
    )
    g.add_argument(
        "--group_sizes",
        dest="eval_group_sizes",
        default=d.eval_group_sizes,
        help="explicit decoding schedule for the evaluation, e.g. '[1]*256' (overrides --eval_steps)",
    )
    g.add_argument(
        "--eval_use_ema", action="store_true", help="evaluate the EMA weights (needs --ema_decay)"
    )
    g.add_argument(
        "--eval_ref_stats",
        default=d.eval_ref_stats,
        help="FID reference statistics (.npz); none: sample only",
    )
    add_sampling_args(p, d.sampling, exclude=("bf16",))
    g = p.add_argument_group("released flags accepted for compatibility")
    g.add_argument("--vqgan_stride", type=int, default=None, help="must be 16 (the LlamaGen VQ)")
    g.add_argument(
        "--vqgan_vocab_size", type=int, default=None, help="= --model_config '{vocab_size: N}'"
    )
    g.add_argument("--class_num", type=int, default=None, help="= --model_config '{class_num: N}'")
    g.add_argument(
        "--resume_epoch",
        type=int,
        default=None,
        help="ignored: the epoch comes from the checkpoint",
    )
    g.add_argument("--evaluate", action="store_true", help="refused: use main_eval.py")
    for name in (
        "--world_size",
        "--local_rank",
        "--local-rank",
        "--dist_url",
    ):  # torchrun's environment rules
        g.add_argument(name, default=None, help=argparse.SUPPRESS)
    g.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags (and ``--config``) -> :class:`TrainConfig`, mapping the released script's extra flags."""
    parser = get_args_parser()
    args = vars(parse_args_with_config(parser, argv))
    for name in ("config", "world_size", "local_rank", "dist_url", "dist_on_itp"):
        args.pop(name, None)
    if args.pop("evaluate"):
        parser.error(
            "--evaluate: evaluation of a checkpoint is main_eval.py here, e.g. "
            "`python main_eval.py --model lpd_l --pretrained_ckpt CKPT --generation_steps 20 --cfg 4.8`"
        )
    stride = args.pop("vqgan_stride")
    if stride not in (None, 16):
        parser.error(f"--vqgan_stride {stride}: only the 16x-downsampling LlamaGen VQ is supported")
    if args.pop("resume_epoch") not in (None, 0):
        print(
            "note: --resume_epoch is ignored; --resume restores the epoch and step from the checkpoint",
            file=sys.stderr,
        )
    overrides = {
        k: v
        for k, v in (
            ("vocab_size", args.pop("vqgan_vocab_size")),
            ("class_num", args.pop("class_num")),
        )
        if v is not None
    }
    if overrides:
        args["model_config"] = {**(args.get("model_config") or {}), **overrides}
    if args["online_eval"] and args["eval_freq"] <= 0:
        args["eval_freq"] = ONLINE_EVAL_FREQ
    args["sampling"] = sampling_from_args(args, bf16=args["bf16"])
    for name in SamplingConfig.__dataclass_fields__:
        if name != "bf16":
            args.pop(name)
    return TrainConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 done, 75 preempted after saving, 1 non-finite loss, 2 bad input (one ``error:`` line)."""
    from lpd.datasets import DataError

    try:
        config = parse_config(argv)
        config.validate()
        info = init_distributed(config.device)
        try:
            result = train(config, info)
            barrier()  # every process is done communicating before any tears the group down
        finally:
            cleanup()
    except NonFiniteLossError as e:
        return report_error(str(e), 1)
    except (ValueError, OSError, CheckpointError, DataError, RankError) as e:
        return report_error(str(e), 2)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        cause = str(e).strip().splitlines()[0][:200]
        print(
            f"process {launch_env()[0]} stopped: another process of the run ended ({cause}); its "
            f"error message says why",
            file=sys.stderr,
        )
        return 1
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    exit_process(main())
