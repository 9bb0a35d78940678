"""Encode an ImageFolder into VQ tokens once, so that training reads tokens instead of images.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 --vqgan_path tokenizers/vq_ds16_c2i.pt \\
        --data_path IMAGENET --cached_path cache/in256 --cache_format consolidated
    python main_cache.py --config configs/tiny.yaml --data_path imgs/ --cached_path cache/   # random test VQ

Every image gets the ADM centre crop to ``--img_size`` and is encoded as is and flipped
horizontally.  ``--cache_format released`` writes one ``.npz`` per image (``indices``,
``indices_flip``) in class folders, the layout of the released code; ``consolidated`` writes a few
large memory-mappable arrays per shard (see :mod:`lpd.datasets`).  Work is split over the ranks of
torchrun / Slurm; an interrupted run is resumed by running the same command again (done images
are skipped; any number of ranks).  ``--data_path`` is the ImageFolder, or a folder holding
``train/``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from lpd.config import parse_args_with_config
from lpd.datasets import CACHE_FORMATS, image_folder, write_token_cache
from lpd.distributed import barrier, cleanup, init_distributed
from lpd.tokenizer import make_tokenizer


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{ch: 32}}', got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Cache VQ tokens of an ImageFolder", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of defaults (e.g. configs/tiny.yaml); flags override it")
    p.add_argument("--data_path", required=False, help="ImageFolder (or a folder holding train/)")
    p.add_argument("--cached_path", required=False, help="output folder of the cache")
    p.add_argument("--cache_format", default="released", choices=list(CACHE_FORMATS))
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--tokenizer", default="vq", choices=["vq", "palette"])
    p.add_argument("--vqgan_path", default=None, help="VQ checkpoint (vq_ds16_c2i.pt)")
    p.add_argument("--vq_config", type=_mapping, default=None, help="VQ architecture (without --vqgan_path: random test VQ)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--shard_size", type=int, default=0, help="consolidated: images per shard (0: automatic)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="weights of the random test VQ (no --vqgan_path)")
    # Keys of shared configs such as configs/tiny.yaml that caching does not use.
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_config", type=_mapping, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args_with_config(get_args_parser(), argv)
    if not args.data_path or not args.cached_path:
        raise SystemExit("main_cache.py: --data_path and --cached_path are required")
    info = init_distributed(args.device)
    try:
        vq = make_tokenizer(args.tokenizer, args.vqgan_path, args.vq_config, args.seed, info.device)
        factor = int(getattr(vq, "downsample_factor", 16))
        if args.img_size % factor:
            raise SystemExit(f"--img_size {args.img_size} is not a multiple of the tokenizer's stride {factor}")
        dataset = image_folder(args.data_path, args.img_size)
        if info.is_main:
            print(f"caching {len(dataset)} images of {len(dataset.classes)} classes from {dataset.root} "
                  f"to {args.cached_path} ({args.cache_format} layout, {info.world_size} process(es))")
        stats = write_token_cache(
            dataset, args.cached_path, vq.encode, args.cache_format,
            img_size=args.img_size, num_tokens=(args.img_size // factor) ** 2,
            vocab_size=int(vq.codebook_size), rank=info.rank, world_size=info.world_size,
            batch_size=args.batch_size, num_workers=args.num_workers, device=info.device, shard_size=args.shard_size,
            barrier=barrier,
        )
        print(f"[rank {info.rank}] encoded {stats.written} images, {stats.skipped} already cached")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
