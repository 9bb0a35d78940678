"""The web app's embedded digits model: images per second for a batch of 8 at 20 steps (orders,
tokens and palette decoding, as ``LPDPipeline`` and the page run them), and the seconds from
``python -m lpd.app`` to a served page.

    python benchmarks/bench_app.py --threads 2 --reps 10 \\
        --output_json benchmarks/results/app_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import describe_host, host_info, summarize, time_call  # noqa: E402

from lpd.app.harness import serve  # noqa: E402
from lpd.app.load import load_app_model  # noqa: E402
from lpd.files import atomic_write_bytes  # noqa: E402
from lpd.pipeline import LPDPipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument(
        "--startups", type=int, default=1, help="times to start python -m lpd.app (0: skip)"
    )
    p.add_argument("--output_json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    app = load_app_model(device=device)
    pipe = LPDPipeline(app.model, app.tokenizer)
    labels = [k % 10 for k in range(args.batch)]

    def run():
        return pipe(
            labels,
            steps=args.steps,
            seed=0,
            cfg=app.cfg,
            repulsion_threshold=app.repulsion_threshold,
        )

    run()  # warm-up
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(args.reps):
        wall, cpu = time_call(run, device)
        times["wall"].append(wall)
        times["cpu"].append(cpu)
    stats = summarize(times)
    record = {
        "host": host_info(device),
        "batch": args.batch,
        "steps": args.steps,
        "cfg": app.cfg,
        **stats,
        "images_per_s": args.batch / stats["wall_median_s"],
        "startup_s": [],
    }
    for _ in range(args.startups):
        t0 = time.perf_counter()
        with serve(["--threads", str(args.threads)] if args.threads else []) as url:
            urllib.request.urlopen(
                url, timeout=120
            ).read()  # the page itself, not only the log line
            record["startup_s"].append(time.perf_counter() - t0)
    print(describe_host(record["host"]))
    print(
        f"embedded model, batch {args.batch}, {args.steps} steps, cfg {app.cfg}: "
        f"{stats['wall_median_s']:.3f} s per batch (median of {args.reps}), "
        f"{record['images_per_s']:.1f} images/s"
    )
    if record["startup_s"]:
        print(
            "python -m lpd.app to a served page: "
            + ", ".join(f"{s:.1f} s" for s in record["startup_s"])
        )
    if args.output_json:
        atomic_write_bytes(
            args.output_json, lambda f: f.write(json.dumps(record, indent=2).encode())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
