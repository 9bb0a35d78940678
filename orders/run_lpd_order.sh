#!/usr/bin/env bash
# Make the order files of the four released LPD evaluation settings (50,000 orders each, the
# released JSON format) under orders/lpd_orders_generated/, using every core.
#
#   bash orders/run_lpd_order.sh            # seed 0
#   SEED=1 NUM=10000 bash orders/run_lpd_order.sh
#
# Order i of a file depends only on (seed, i), so a file can be regenerated, or extended with
# --start, bit for bit.  Generated files are not meant for git.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
SEED="${SEED:-0}"
NUM="${NUM:-50000}"
OUT="${OUT:-orders/lpd_orders_generated}"

gen() {  # img_size steps repulsion name
  "$PYTHON" -m lpd.orders --img_size "$1" --generation_steps "$2" --repulsion_threshold "$3" \
    --num "$NUM" --seed "$SEED" --output_file "$OUT/$4.json"
}

gen 256 20 2.0 res256_steps20_repulsion2   # L-256 / XL-256, 20 steps
gen 256 20 3.0 res256_steps20_repulsion3   # XXL-256, 20 steps
gen 256 32 2.0 res256_steps32_repulsion2   # L-256 / XL-256, 32 steps
gen 512 48 4.0 res512_steps48_repulsion4   # L-512 / XL-512, 48 steps
