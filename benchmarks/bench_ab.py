"""Speed of two checkouts of lpd side by side (e.g. before and after a change), in one run.

    git worktree add /tmp/lpd-before <REV>
    python benchmarks/bench_ab.py --before /tmp/lpd-before --after . --pairs 11

Each case runs in a fresh process per tree, A B A B ..., one torch thread; a process times
``--reps`` calls after a warm-up call with CPU time. Printed: the medians and the median of the
per-pair ratios after/before. Cases: tiny sampling (batch 4, CFG 4, 20 steps), a tiny training
step (batch 8, AdamW) and LPD-L sampling (batch 1, CFG 4, 20 steps); random weights, same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("tiny_b4_cfg4_20steps", "train_tiny_b8", "L_b1_cfg4_20steps")


def run_case(case: str, reps: int) -> dict:
    """Time ``case`` in this process (``lpd`` from ``PYTHONPATH``)."""
    import torch

    from lpd.models import build_lpd
    from lpd.sampling import SamplingConfig, sample_tokens
    from lpd.schedules import group_sizes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = (1024, 24, 16) if case.startswith("L") else (256, 4, 4)
    model = build_lpd(img_size=256, embed_dim=width[0], depth=width[1], num_heads=width[2])
    g, sizes = torch.Generator().manual_seed(1), group_sizes(256, 20)
    B = 8 if case.startswith("train") else 4 if case.startswith("tiny") else 1
    labels = torch.randint(0, 1000, (B,), generator=g)
    orders = torch.stack([torch.randperm(256, generator=g) for _ in range(B)])
    if case.startswith("train"):
        tokens = torch.randint(0, 16384, (B, 256), generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        model.train()

        def call() -> None:
            loss = model(tokens, labels, orders, sizes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
    else:
        model.eval()

        def call() -> None:
            gen = torch.Generator().manual_seed(2)
            sample_tokens(model, labels, orders, sizes, SamplingConfig(cfg=4.0), generator=gen)

    call()
    times = []
    for _ in range(reps):
        t = time.process_time()
        call()
        times.append(time.process_time() - t)
    return {"case": case, "median_cpu_s": statistics.median(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="root of the first checkout (A)")
    p.add_argument("--after", default=".", help="root of the second checkout (B)")
    p.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}"
    )
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--output_json", default=None)
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._case:
        print(json.dumps(run_case(args._case, args.reps)))
        return 0
    out = {}
    for case in args.cases.split(","):
        res: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.pairs):
            for tag, root in (("before", args.before), ("after", args.after)):
                env = dict(os.environ, PYTHONPATH=os.path.abspath(root), OMP_NUM_THREADS="1")
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--before",
                    ".",
                    "--_case",
                    case,
                    "--reps",
                    str(args.reps),
                ]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
                if proc.returncode:
                    raise SystemExit(f"{tag} ({root}) failed on {case}: {proc.stderr[-2000:]}")
                res[tag].append(json.loads(proc.stdout.strip().splitlines()[-1])["median_cpu_s"])
        ratio = statistics.median(b / a for a, b in zip(res["before"], res["after"]))
        out[case] = {
            "before_s": statistics.median(res["before"]),
            "after_s": statistics.median(res["after"]),
            "after_over_before": ratio,
            **res,
        }
        print(
            f"{case}: before {out[case]['before_s']:.3f} s, after {out[case]['after_s']:.3f} s, "
            f"after/before {ratio:.3f} (median of {args.pairs} pairs)",
            flush=True,
        )
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
