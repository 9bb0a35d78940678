#!/usr/bin/env bash
# Create (or update) the Python environment for lpd, from nothing, idempotently.
#
#   bash environment_setup.sh            # .venv at the repository root (or the active venv/conda env)
#   bash environment_setup.sh PATH       # a virtual environment at PATH
#
# Environment variables:
#   LPD_TORCH_SPEC  pip requirement(s) for PyTorch (default "torch==2.14.1 torchvision==0.29.1";
#                   set e.g. "torch torchvision --index-url https://download.pytorch.org/whl/cu124"
#                   to pick another build).  Skipped when a working torch + torchvision is present.
#   LPD_EXTRAS      extras to install with the package (default "test,t2i,app": the tests, text-to-image, the web app).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-python3}"

if [ $# -ge 1 ]; then
  venv="$1"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  venv="$VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  venv="$CONDA_PREFIX"
else
  venv="$here/.venv"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[lpd] creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  spec="${LPD_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
  echo "[lpd] installing PyTorch: $spec"
  # shellcheck disable=SC2086
  "$py" -m pip install -q $spec
fi

extras="${LPD_EXTRAS-test,t2i,app}"
target="$here"
[ -n "$extras" ] && target="$here[$extras]"
echo "[lpd] installing lpd and its dependencies into $venv"
"$py" -m pip install -q -e "$target"
"$py" -c "import torch, lpd; print(f'[lpd] ready: lpd {lpd.__version__}, torch {torch.__version__}, python at $py')"
