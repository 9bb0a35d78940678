#!/usr/bin/env bash
# The GPU check in one command: parity on the device, the paper's speed protocol, training steps.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py flags: --released_repo DIR, --sections ..., --dry_run]
#
# OUT_DIR (default gpu_check_<date>-<time>) must be new or empty; it receives results.json and
# table.md (rewritten after every row), and gpu_check.png. The run ends within GPU_CHECK_BUDGET_S
# seconds (default 450; 90 with --dry_run) plus start-up; a hard limit 30 s later stops it, keeping what was written.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="gpu_check_$(date +%Y%m%d-%H%M%S)"
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
  out="$1"
  shift
fi
budget="${GPU_CHECK_BUDGET_S:-450}"
case " $* " in *" --dry_run "*) budget="${GPU_CHECK_BUDGET_S:-90}" ;; esac
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=10 "$((${budget%.*} + 30))" \
  "${PYTHON:-python3}" "$here/gpu_check.py" --out "$out" --budget_s "$budget" "$@"
