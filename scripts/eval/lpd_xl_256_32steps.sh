#!/usr/bin/env bash
# LPD-XL 256 px, 32 steps (paper: FID / IS 1.92 / 319.4). Extra flags are passed on, e.g.
#   NGPUS=4 bash scripts/eval/lpd_xl_256_32steps.sh --bf16 --output_dir /data/eval
set -euo pipefail
cd "$(dirname "$0")/../.."
exec torchrun --nproc_per_node="${NGPUS:-8}" main_eval.py --config configs/eval_lpd_xl_256_32steps.yaml "$@"
