#!/usr/bin/env bash
# The CPU demo: train a small LPD on handwritten digits, decode it with locality-aware, random and
# raster orders in 8..256 steps, edit the held-out digits zero-shot, and score everything with 95%
# bootstrap intervals. About 6.5 minutes on 2 free CPU cores (training 3, sampling and scoring 2.5,
# editing 1) after the set-up; longer on shared cores.
#
#   bash scripts/demo.sh [OUTPUT_DIR] [extra flags of python -m lpd.demo]     (default outputs/demo)
#   bash scripts/demo.sh --t2i [OUTPUT_DIR] [extra flags of python -m lpd.demo --task t2i]
#
# --t2i: the compositional text-to-image testbed on 2 threads (default outputs/demo_t2i; README,
# "The compositional testbed"). Installs what it needs first if it is missing
# (environment_setup.sh), then runs `python -m lpd.demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
task=() extras="" need="import lpd, torch, matplotlib" out="outputs/demo"
if [ "${1:-}" = "--t2i" ]; then
  shift
  task=(--task t2i --threads 2) extras="t2i" need="$need, wordllama, tokenizers" out="outputs/demo_t2i"
fi
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then out="$1" && shift; fi
if [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -c "$need" >/dev/null 2>&1; then
  py="$VIRTUAL_ENV/bin/python"
elif [ -x "$root/.venv/bin/python" ] && "$root/.venv/bin/python" -c "$need" >/dev/null 2>&1; then
  py="$root/.venv/bin/python"
else
  echo "[demo] setting up the environment first (environment_setup.sh)"
  LPD_EXTRAS="$extras" bash "$root/environment_setup.sh"
  py="$root/.venv/bin/python"
fi

exec "$py" -m lpd.demo "${task[@]}" --output_dir "$out" "$@"
