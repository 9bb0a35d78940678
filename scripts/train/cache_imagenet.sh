#!/usr/bin/env bash
# Encode ImageNet once with the VQ tokenizer (image + flipped copy per file).
#   IMAGENET=/data/imagenet bash scripts/train/cache_imagenet.sh 256 [--cache_format released]
# Writes data/imagenet_tokens_<size> (consolidated layout by default). Rerun the same command to
# resume an interrupted run. Uses every GPU of this node; for several nodes use scripts/slurm.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE="${1:-256}"; shift || true
torchrun --nproc_per_node="${NPROC_PER_NODE:-8}" main_cache.py \
  --img_size "$SIZE" --vqgan_path "${VQGAN_PATH:-tokenizers/vq_ds16_c2i.pt}" \
  --data_path "${IMAGENET:?set IMAGENET to the ImageNet folder (holding train/)}" \
  --cached_path "${CACHED_PATH:-data/imagenet_tokens_$SIZE}" --cache_format consolidated \
  --batch_size 64 "$@"
