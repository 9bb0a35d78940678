"""Train an LPD model (the released recipe) on one process, under torchrun, or through scripts/slurm.py.

    # smoke test on a CPU, from a token cache written by main_cache.py
    torchrun --nproc_per_node=2 main_train.py --config configs/tiny.yaml --use_cached \\
        --cached_path cache/ --epochs 3 --batch_size 4 --save_every_steps 2 --output_dir out/
    # LPD-L at 256 px on 32 GPUs (see scripts/train/ and configs/train_*.yaml)
    torchrun --nnodes 4 --nproc_per_node 8 ... main_train.py --config configs/train_lpd_l_256.yaml \\
        --cached_path CACHE --output_dir outputs/lpd_l_256 --auto_resume

Writes to ``--output_dir``: ``checkpoint-last.pth`` (every ``--save_every_steps`` steps, every epoch
end, and on SIGTERM / SIGUSR1), ``checkpoint-{epoch}.pth`` every ``--save_every_epochs`` epochs,
``log.txt`` (JSON lines), ``config.yaml`` and TensorBoard events when tensorboard is installed.
``--resume DIR`` continues exactly where the run stopped.  Exit status 75 means "stopped by a
preemption signal after saving; resume me".  The loop lives in :mod:`lpd.train`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from lpd.config import parse_args_with_config
from lpd.distributed import cleanup, init_distributed
from lpd.lr_sched import LR_SCHEDULES
from lpd.train import PREEMPTED_EXIT_CODE, NonFiniteLossError, TrainConfig, train


def _mapping(text: str) -> dict[str, Any]:
    """A YAML / JSON mapping given on the command line, e.g. ``'{embed_dim: 64, depth: 2}'``."""
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{embed_dim: 64}}', got {text!r}")
    return value


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser("LPD training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (flag names as keys); flags override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="preset: lpd_l, lpd_xl, lpd_xxl, lpd_tiny")
    g.add_argument("--img_size", type=int, default=d.img_size, help="image size in pixels (256 or 512)")
    g.add_argument("--model_config", type=_mapping, default=None, help="build_lpd kwargs overriding the preset (YAML mapping)")
    g.add_argument("--label_drop_prob", type=float, default=None, help="label dropout (default: the model's, 0.1)")
    g.add_argument("--attn_dropout", type=float, default=None, help="accepted for the released flags (inactive, spec section 6)")
    g.add_argument("--proj_dropout", type=float, default=None, help="dropout after attention projection and in the MLP (default 0.1)")
    g.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False, help="recompute block activations in backward")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=["vq", "palette"])
    g.add_argument("--vqgan_path", default=d.vqgan_path, help="VQ checkpoint (vq_ds16_c2i.pt); images are encoded on the fly")
    g.add_argument("--vq_config", type=_mapping, default=None, help="VQ architecture (without --vqgan_path: random test VQ)")
    g = p.add_argument_group("data")
    g.add_argument("--use_cached", action=argparse.BooleanOptionalAction, default=False, help="train from a token cache (main_cache.py)")
    g.add_argument("--cached_path", default=d.cached_path, help="token cache folder (released or consolidated layout)")
    g.add_argument("--cache_format", default=d.cache_format, choices=["auto", "released", "consolidated"])
    g.add_argument("--data_path", default=d.data_path, help="ImageFolder (or a folder with train/) when not cached")
    g.add_argument("--num_workers", type=int, default=d.num_workers)
    g.add_argument("--pin_mem", type=_bool, default=d.pin_mem, help="pin host memory for GPU copies (true/false)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="per process; global = batch_size x world size")
    g.add_argument("--blr", type=float, default=d.blr, help="base lr: lr = blr x global batch / 256")
    g.add_argument("--lr", type=float, default=d.lr, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=d.min_lr)
    g.add_argument("--lr_schedule", default=d.lr_schedule, choices=list(LR_SCHEDULES))
    g.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--lr_decay_start_epoch", type=float, default=d.lr_decay_start_epoch, help="constant+cosine: cosine from here")
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--grad_clip", type=float, default=d.grad_clip, help="max gradient norm (0: no clipping)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (GPU; also works on a CPU)")
    g.add_argument("--group_sizes_list", default=d.group_sizes_list,
                   help="schedules separated by ';' (e.g. '[1]*256; [1*41, 2*46, 3*41]') or a YAML file of them; "
                        "default: the released tables of --img_size")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda (cuda gets the local rank)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--log_dir", default=d.log_dir, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--resume", default=d.resume, help="checkpoint file, or an output folder with checkpoint-last.pth")
    g.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=False, help="resume from OUTPUT_DIR/checkpoint-last.pth when it exists")
    g.add_argument("--pretrained_ckpt", default=d.pretrained_ckpt,
                   help="initial weights (e.g. the 256 px model for 512 px fine-tuning; pos_embed is interpolated)")
    g.add_argument("--save_every_steps", type=int, default=d.save_every_steps, help="checkpoint-last.pth every N steps (0: off)")
    g.add_argument("--save_every_epochs", type=int, default=d.save_every_epochs, help="checkpoint-{epoch}.pth every K epochs")
    g.add_argument("--log_freq", type=int, default=d.log_freq, help="log every N steps")
    g.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False, help="log to Weights & Biases (when installed)")
    g.add_argument("--wandb_project", default=d.wandb_project)
    g.add_argument("--run_name", default=d.run_name)
    g.add_argument("--preempt_signals", default=d.preempt_signals, help="signals that save and stop (comma-separated)")
    g = p.add_argument_group("evaluation during training (lpd.evaluate)")
    g.add_argument("--eval_freq", type=int, default=d.eval_freq, help="evaluate every N epochs (0: never)")
    g.add_argument("--eval_num_images", type=int, default=d.eval_num_images)
    g.add_argument("--eval_bsz", type=int, default=d.eval_bsz)
    g.add_argument("--eval_steps", type=int, default=d.eval_steps, help="decoding steps")
    g.add_argument("--cfg", type=float, default=d.cfg, help="classifier-free guidance scale")
    g.add_argument("--eval_ref_stats", default=d.eval_ref_stats, help="FID reference statistics (.npz); none: sample only")
    return p


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    args = vars(parse_args_with_config(get_args_parser(), argv))
    args.pop("config", None)
    return TrainConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    config.validate()
    info = init_distributed(config.device)
    try:
        result = train(config, info)
    except NonFiniteLossError as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
