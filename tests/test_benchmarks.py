"""The benchmark scripts run and write what they promise (no timing is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_matmul_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "mm.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_matmul.py"), "--threads", "1",
         "--in_features", "64", "--out_features", "96", "--rows", "1,5", "--min_seconds", "0.01",
         "--output_json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bf16 / fastest fp32" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["rows"] for r in data["results"]] == [1, 5]
    for r in data["results"]:
        for key in ("fp32", "fp32 packed", "bf16", "bf16 autocast"):
            assert r[key] > 0
        assert abs(r["bf16/fp32"] - r["bf16"] / max(r["fp32"], r["fp32 packed"])) < 1e-9
    assert isinstance(data["host"]["native_bf16"], bool)
    assert (tmp_path / "mm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_matmul_rejects_bad_rows(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_matmul.py"), "--rows", "0,4"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rows must be positive" in proc.stderr


def test_bench_sampling_draws_its_charts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sampling", os.path.join(ROOT, "benchmarks", "bench_sampling.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = [{"model": "tiny", "batch": b, "steps": s, "cfg": 5.0, "dtype": "fp32", "compile": False, "vq": False,
                "wall_median_s": 0.01 * s * b, "images_per_s": 100.0 / s} for b in (1, 8) for s in (8, 32)]
    records[0]["released"] = {"wall_median_s": 0.2}
    paths = bench.draw_charts(records, str(tmp_path / "bs"))
    assert paths == [str(tmp_path / "bs_latency.png"), str(tmp_path / "bs_throughput.png")]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
