"""What the hardware gives a decoding step: GFLOP/s of one transformer linear layer per dtype.

A decoding step of LPD multiplies few rows (batch x CFG x the rows of the step: about 26-52 for
LPD-L at batch 1, 20 steps) by every weight of the model, so the speed of small-row matrix
products bounds the sampler.  This prints, for a layer of the chosen width (LPD-L's MLP: 1024 ->
4096), the throughput of

* ``fp32``          ``F.linear`` in float32 (what the released sampler runs),
* ``fp32 packed``   :class:`lpd.models.lpd.Linear`'s CPU inference path (oneDNN-prepacked weight),
* ``bf16``          ``F.linear`` on bfloat16 tensors (what bf16 autocast runs),
* ``bf16 autocast`` :class:`lpd.models.lpd.Linear` under ``torch.autocast(dtype=bfloat16)``,

over a range of row counts, and the bf16 / fp32 ratio.  On CPUs without AVX512-BF16 or AMX
(:func:`lpd.sampling.cpu_has_native_bf16`), oneDNN emulates bf16 products and the ratio is well
below 1: bf16 cannot make sampling faster there, whatever the sampler does.

    python benchmarks/bench_matmul.py --threads 1 --output_json benchmarks/results/matmul_cpu_1thread.json
    python benchmarks/bench_matmul.py --device cuda --output_json out/matmul_cuda.json

writes the numbers as JSON and a plot next to it (same name, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import describe_host, host_info, parse_list, sync  # noqa: E402

from lpd.files import atomic_write_bytes  # noqa: E402
from lpd.models.kernels import Linear  # noqa: E402


def gflops(fn, flops: float, device: torch.device, min_seconds: float) -> float:
    """Best-of-five throughput; each timing repeats ``fn`` for at least ``min_seconds / 5``."""
    fn()
    sync(device)
    reps, best = 1, float("inf")
    while True:  # calibrate the repeat count
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        dt = time.perf_counter() - t
        if dt >= min_seconds / 5 or reps >= 1 << 16:
            break
        reps *= 2
    best = dt / reps
    for _ in range(4):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return flops / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--in_features", type=int, default=1024)
    p.add_argument("--out_features", type=int, default=4096)
    p.add_argument("--rows", default="1,4,8,16,26,52,104,256", help="comma-separated row counts")
    p.add_argument("--min_seconds", type=float, default=0.5, help="time spent per measurement")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = parse_list(args.rows, int)
    if not rows or min(rows) < 1:
        p.error(f"--rows must be positive integers, got {args.rows!r}")

    info = host_info(device)
    print(describe_host(info))
    torch.manual_seed(0)
    layer = Linear(args.in_features, args.out_features).to(device).eval()
    w32, b32 = layer.weight.detach(), layer.bias.detach()
    w16, b16 = w32.bfloat16(), b32.bfloat16()
    k, n = args.in_features, args.out_features
    results = []
    names = ["fp32", "fp32 packed", "bf16", "bf16 autocast"]
    print(
        f"{'rows':>5} "
        + " ".join(f"{m:>14}" for m in names)
        + f" {'bf16/fp32':>10}   (GFLOP/s, {k} -> {n})"
    )
    with torch.no_grad():
        for m in rows:
            x32 = torch.randn(m, k, device=device)
            x16 = x32.bfloat16()
            flops = 2.0 * m * k * n

            row = {
                "rows": m,
                "fp32": gflops(lambda: F.linear(x32, w32, b32), flops, device, args.min_seconds),
                "fp32 packed": gflops(lambda: layer(x32), flops, device, args.min_seconds),
                "bf16": gflops(lambda: F.linear(x16, w16, b16), flops, device, args.min_seconds),
            }
            # one autocast region around all the calls, as in sample_tokens (the weight's bf16 copy
            # is then made once and cached by autocast, not on every call)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                row["bf16 autocast"] = gflops(lambda: layer(x32), flops, device, args.min_seconds)
            row["bf16/fp32"] = row["bf16"] / max(row["fp32"], row["fp32 packed"])
            results.append(row)
            print(
                f"{m:>5} "
                + " ".join(f"{row[name]:>14.1f}" for name in names)
                + f" {row['bf16/fp32']:>10.2f}"
            )

    ratios = sorted(r["bf16/fp32"] for r in results)
    median = ratios[len(ratios) // 2]
    print(
        f"bf16 / fastest fp32: median {median:.2f}x over these row counts (range {ratios[0]:.2f}-{ratios[-1]:.2f})"
        + (" -- bf16 cannot speed up decoding on this device" if median < 1 else "")
    )
    if args.output_json:
        out = {"host": info, "in_features": k, "out_features": n, "results": results}
        text = json.dumps(out, indent=2).encode()
        atomic_write_bytes(args.output_json, lambda f: f.write(text))
        from lpd.plotting import line_chart

        png = os.path.splitext(args.output_json)[0] + ".png"
        line_chart(
            png,
            [
                {
                    "series": {name: [(r["rows"], r[name]) for r in results] for name in names},
                    "title": f"linear {k} -> {n}: GFLOP/s vs rows",
                    "xlabel": "rows (log)",
                    "ylabel": "GFLOP/s",
                    "log_x": True,
                }
            ],
            title=describe_host(info)[:110],
        )
        print(f"wrote {args.output_json} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
