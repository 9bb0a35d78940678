"""Fetch every file a row of the paper's table needs, into the caches that main_eval.py reads.

    python -m lpd.download lpd_l 256         # checkpoint, LlamaGen VQ, ADM statistics, Inception
    python -m lpd.download lpd_l 256 --list  # only print the same as commands (for another machine)
    python -m lpd.download vq_ds16_t2i.pt    # one LlamaGen VQ alone (for text-to-image training)

Then `HF_HUB_OFFLINE=1 python main_eval.py --model lpd_l --img_size 256 ...` needs no network.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lpd import hub
from lpd.config import HelpFormatter
from lpd.metrics import INCEPTION_WEIGHTS_URL, inception_cache, resolve_inception_weights


def fetch(model: str, img_size: int) -> dict[str, str]:
    """Every file of a ``main_eval.py`` run of the released ``model`` at ``img_size``, by name."""
    more = {
        "ADM statistics": lambda: hub.resolve_fid_stats(img_size),
        "Inception weights": resolve_inception_weights,
    }
    return hub.resolve_model_files(model, img_size, more=more)


def commands(model: str, img_size: int) -> list[str]:
    """Shell commands that put the same files where lpd looks for them."""
    checkpoint = hub.CHECKPOINT_FILENAME.format(model=model, img_size=img_size)
    stats = os.path.join(hub.fid_stats_dir(), hub.FID_STATS_FILENAME.format(img_size=img_size))
    inception = os.path.join(inception_cache(), os.path.basename(INCEPTION_WEIGHTS_URL))
    return [
        f"hf download {hub.RELEASED_CHECKPOINTS[model, img_size]} {checkpoint}",
        f"hf download {hub.VQ_REPO} {hub.VQ_FILENAME}",
        f"curl -fL --create-dirs -o {stats} {hub.FID_STATS_SOURCES[img_size][0]}",
        f"curl -fL --create-dirs -o {inception} {INCEPTION_WEIGHTS_URL}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; missing files print one ``error:`` message naming each of them, and return 2."""
    released = hub.RELEASED_CHECKPOINTS
    kw = {"allow_abbrev": False, "description": __doc__, "formatter_class": HelpFormatter}
    p = argparse.ArgumentParser(prog="python -m lpd.download", **kw)
    models, sizes = sorted({m for m, _ in released}), sorted({s for _, s in released})
    p.add_argument("model", choices=models + list(hub.VQ_FILENAMES), help="model or a VQ alone")
    p.add_argument("img_size", type=int, nargs="?", choices=sizes, help="pixels (of a model)")
    p.add_argument("--list", action="store_true", help="print the commands only; fetch nothing")
    args = p.parse_args(argv)
    if args.model in hub.VQ_FILENAMES:  # into the Hub cache, where --vqgan_path NAME finds it
        print(f"The same with the command-line tools: hf download {hub.VQ_REPO} {args.model}")
        if args.list:
            return 0
        try:
            path = hub.hub_file(hub.VQ_REPO, args.model, what="VQ tokenizer", flag="--vqgan_path")
        except hub.ResolveError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"VQ tokenizer: {path}")
        return 0
    if args.img_size is None:
        p.error(f"give the image size of {args.model}: one of {sizes}")
    if (args.model, args.img_size) not in released:
        pairs = ", ".join(f"{m} {s}" for m, s in released)
        msg = f"{args.model} was not released at {args.img_size} px; released: {pairs}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print("The same with the command-line tools (HF_HUB_CACHE / HF_HOME choose the Hub cache):")
    print("\n".join(f"  {c}" for c in commands(args.model, args.img_size)), flush=True)
    if args.list:
        return 0
    try:
        paths = fetch(args.model, args.img_size)
    except hub.ResolveError as e:
        print(f"error: {e}", file=sys.stderr)  # several lines: one per missing file
        return 2
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    print(
        f"ready: `HF_HUB_OFFLINE=1 python main_eval.py --model {args.model} --img_size "
        f"{args.img_size}` finds every file without network access"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
