"""``python -m lpd.app.embed``: train the app's embedded digits model by the CPU demo's recipe
(``python -m lpd.demo``, ``configs/demo.yaml``) and export it into the package
(``lpd/data/app_digits/``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lpd.app.load import EMBEDDED_DIR
from lpd.config import parse_args_with_config
from lpd.demo.run import build_parser
from lpd.demo.run import main as demo_main
from lpd.export import export
from lpd.files import CheckpointError
from lpd.sampling import sampling_from_args

# the demo's training stage as configured; the short ablation after it reports the digit accuracy
DEMO_FLAGS = "--orders lpd --steps 20 --num_images 200 --resamples 100 --no-editing".split()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lpd.app.embed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--work_dir",
        default="outputs/app_embed",
        help="the demo's output folder (a finished run is reused)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a demo training checkpoint to export instead of training "
        "(outputs/demo/train/checkpoint-last.pth)",
    )
    p.add_argument(
        "--output_dir", default=EMBEDDED_DIR, help="the export folder the app loads by default"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    args = p.parse_args(argv)
    ckpt = args.checkpoint or os.path.join(args.work_dir, "train", "checkpoint-last.pth")
    if args.checkpoint is None and (rc := demo_main(["--output_dir", args.work_dir, *DEMO_FLAGS])):
        return rc
    try:
        demo = sampling_from_args(parse_args_with_config(build_parser(), []))  # the page's defaults
        export(ckpt, args.output_dir, overwrite=args.overwrite, sampling=demo.to_dict())
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir} from {ckpt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
