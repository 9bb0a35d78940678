#!/usr/bin/env bash
# LPD-L 256 px, 20 steps (paper: FID / IS 2.40 / 284.5). Extra flags are passed on, e.g.
#   NGPUS=4 bash scripts/eval/lpd_l_256_20steps.sh --bf16 --output_dir /data/eval
set -euo pipefail
cd "$(dirname "$0")/../.."
exec torchrun --nproc_per_node="${NGPUS:-8}" main_eval.py --config configs/eval_lpd_l_256_20steps.yaml "$@"
