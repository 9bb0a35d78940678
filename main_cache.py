"""Encode an ImageFolder into VQ tokens once, so that training reads tokens instead of images.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 --vqgan_path tokenizers/vq_ds16_c2i.pt \\
        --data_path IMAGENET --cached_path cache/in256 --cache_format consolidated
    python main_cache.py --config configs/tiny.yaml --data_path imgs/ --cached_path cache/   # random test VQ

Each image is ADM centre-cropped to ``--img_size`` and encoded as is and flipped, into the ``released``
layout (one ``.npz`` per image) or the ``consolidated`` one (shards; docs/design.md). Ranks of torchrun /
Slurm split the work; the same command resumes, with any number of ranks. User errors exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lpd.config import ConfigError, HelpFormatter, check_seed, parse_args_with_config, yaml_mapping
from lpd.datasets import (
    CACHE_FORMATS,
    CacheError,
    CacheJob,
    image_folder,
    tokenizer_id,
    write_token_cache,
)
from lpd.devices import available_cpus
from lpd.distributed import barrier, cleanup, init_distributed
from lpd.files import CheckpointError
from lpd.text.cache import add_caption_args, cache_captions
from lpd.tokenizer import make_tokenizer


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "Cache VQ tokens of an ImageFolder",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML file of defaults (e.g. configs/tiny.yaml); flags override it",
    )
    p.add_argument("--data_path", required=False, help="ImageFolder (or a folder holding train/)")
    p.add_argument("--cached_path", required=False, help="output folder of the cache")
    p.add_argument("--cache_format", default="released", choices=list(CACHE_FORMATS))
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--tokenizer", default="vq", choices=["vq", "palette"])
    p.add_argument("--vqgan_path", default=None, help="VQ checkpoint (vq_ds16_c2i.pt)")
    p.add_argument(
        "--vq_config",
        type=yaml_mapping,
        default=None,
        help="VQ architecture (without --vqgan_path: random test VQ)",
    )
    p.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    p.add_argument(
        "--num_workers", type=int, default=min(4, available_cpus()), help="DataLoader processes"
    )
    p.add_argument(
        "--shard_size", type=int, default=0, help="consolidated: images per shard (0: automatic)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--seed", type=int, default=0, help="weights of the random test VQ (no --vqgan_path)"
    )
    add_caption_args(p)
    return p


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad values with a ValueError naming the flag and the fix (types and choices: argparse, lpd.config)."""
    for flag, low in (("img_size", 1), ("batch_size", 1), ("num_workers", 0), ("shard_size", 0)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag} {getattr(args, flag)!r}: give an integer >= {low}")
    if not args.captions and (not args.data_path or not os.path.isdir(args.data_path)):
        raise ValueError(
            f"--data_path {args.data_path or 'is missing'}: give an existing ImageFolder (class "
            f"sub-folders of images) or a folder holding train/"
        )
    if not args.cached_path or (
        os.path.exists(args.cached_path) and not os.path.isdir(args.cached_path)
    ):
        raise ValueError(
            f"--cached_path {args.cached_path or 'is missing'}: give the cache folder (new, or the one "
            f"of the run to resume)"
        )
    check_seed(args.seed)


def _user_message(e: Exception, setting_up: bool) -> str | None:
    """The one-line message of an error the user can fix, ``None`` for a bug (which keeps its traceback)."""
    known = (CacheError, CheckpointError, ConfigError, FileNotFoundError) + (
        (ValueError,) if setting_up else ()
    )
    if isinstance(
        e, known
    ):  # FileNotFoundError: ResolveError too; ValueError: flags, configs, tokenizer settings
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    setting_up = True
    try:
        from main_train import get_args_parser as train_parser

        args = parse_args_with_config(
            get_args_parser(), argv, also_known=train_parser()
        )  # training configs work too
        validate_args(args)
        try:
            info = init_distributed(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r}: {e}") from e
        vq = make_tokenizer(args.tokenizer, args.vqgan_path, args.vq_config, args.seed, info.device)
        factor = int(getattr(vq, "downsample_factor", 16))
        if args.img_size % factor:
            raise ValueError(
                f"--img_size {args.img_size}: give a multiple of the tokenizer's stride {factor}"
            )
        if args.captions:  # image-caption data into a consolidated cache with captions
            return cache_captions(args, vq, info, barrier) or 0
        dataset = image_folder(args.data_path, args.img_size)
        setting_up = False
        if info.is_main:
            print(
                f"caching {len(dataset)} images of {len(dataset.classes)} classes from {dataset.root} "
                f"to {args.cached_path} ({args.cache_format} layout, {info.world_size} process(es))"
            )
        stats = write_token_cache(
            dataset,
            args.cached_path,
            vq.encode,
            args.cache_format,
            tokenizer=tokenizer_id(vq),
            img_size=args.img_size,
            num_tokens=(args.img_size // factor) ** 2,
            vocab_size=int(vq.codebook_size),
            job=CacheJob.from_args(args, info, barrier),
        )
        print(f"[rank {info.rank}] encoded {stats.written} images, {stats.skipped} already cached")
    except Exception as e:  # noqa: BLE001 - user errors become one line, the rest is re-raised
        msg = _user_message(e, setting_up)
        if msg is None:
            raise
        print("error: " + " ".join(line.strip() for line in msg.splitlines()), file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
