#!/usr/bin/env bash
# LPD-XL, 512 px fine-tune (configs/train_lpd_xl_512.yaml) with plain torchrun. Run this on every node with its NODE_RANK;
# the defaults assume 8 nodes x 8 GPUs (global batch 2048). Extra arguments go to main_train.py,
# e.g. --cached_path CACHE --output_dir DIR. A preempted or crashed run restarts where it stopped
# (--auto_resume picks up OUTPUT_DIR/checkpoint-last.pth). On Slurm use scripts/slurm.py instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun \
  --nnodes="${NNODES:-8}" --nproc_per_node="${NPROC_PER_NODE:-8}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  main_train.py --config configs/train_lpd_xl_512.yaml --auto_resume "$@"
