"""Make a CPU-runnable copy of the released LPD model files for same-run comparisons.

The released implementation (github.com/mit-han-lab/lpd, MAR lineage) is not part of this
project and is never copied into it.  Given a local checkout of it, this script copies the four
files the benchmarks import (``models/lpd.py``, ``models/block.py``, ``models/mask.py``,
``models/sampling.py``) into ``DEST/models/`` and replaces the CUDA device that file fixes in code (the ``cuda`` method call
and a device variable set to the cuda string in ``models/lpd.py``) by the model's own device, so that it also runs on a
CPU.  Nothing else changes; on a GPU the checkout can be used as it is.

    git clone https://github.com/mit-han-lab/lpd /tmp/lpd_released_src
    python benchmarks/reference/prepare_released.py /tmp/lpd_released_src /tmp/lpd_released
    python benchmarks/bench_sampling.py --goals --released_repo /tmp/lpd_released

The released files need ``timm`` (installed with this project).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil

FILES = ("lpd.py", "block.py", "mask.py", "sampling.py")

# (pattern, replacement) applied to models/lpd.py only.
DEVICE_FIXES = (
    (re.compile(r"\.cuda\(\)"), ".to(self.pos_embed.device)"),
    (re.compile(r"""device\s*=\s*["']cuda["']\s*$""", re.M), "device = self.pos_embed.device"),
)


def prepare(src: str, dest: str) -> list[str]:
    """Copy and patch; returns a description of every replacement made."""
    src_models = os.path.join(src, "models")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(src_models, f))]
    if missing:
        raise FileNotFoundError(
            f"{src!r} is not a released LPD checkout: models/{', models/'.join(missing)} missing"
        )
    out_models = os.path.join(dest, "models")
    os.makedirs(out_models, exist_ok=True)
    open(os.path.join(out_models, "__init__.py"), "a").close()
    log = []
    for name in FILES:
        shutil.copyfile(os.path.join(src_models, name), os.path.join(out_models, name))
    path = os.path.join(out_models, "lpd.py")
    with open(path) as f:
        text = f.read()
    for pattern, repl in DEVICE_FIXES:
        text, n = pattern.subn(repl, text)
        log.append(f"models/lpd.py: {pattern.pattern!r} -> {repl!r} ({n}x)")
    with open(path, "w") as f:
        f.write(text)
    return log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkout of the released LPD repository")
    p.add_argument("dest", help="where to write the CPU-runnable copy (outside this repository)")
    args = p.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.abspath(args.dest).startswith(here + os.sep):
        raise SystemExit(
            "write the copy outside this repository: released code is not shipped with lpd"
        )
    for line in prepare(args.src, args.dest):
        print(line)
    print(f"prepared {args.dest}; pass --released_repo {args.dest} to the benchmarks")


if __name__ == "__main__":
    main()
