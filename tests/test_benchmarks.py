"""The benchmark scripts run and write what they promise (no timing is asserted here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import background, run_process, wait_for_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_matmul_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "mm.json"
    proc = run_process(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_matmul.py"),
            "--threads",
            "1",
            "--in_features",
            "64",
            "--out_features",
            "96",
            "--rows",
            "1,5",
            "--min_seconds",
            "0.01",
            "--output_json",
            str(out),
        ],
        300,
    )
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
    proc = run_process(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_matmul.py"), "--rows", "0,4"], 120
    )
    assert proc.returncode == 2 and "--rows must be positive" in proc.stderr


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh: its dry run (tiny shapes on the CPU) is the check of the GPU script
# ---------------------------------------------------------------------------------------------

GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def gpu_check(out, *flags, **kw):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT}
    return run_process(["bash", GPU_CHECK, str(out), "--dry_run", *flags], 400, env=env, **kw)


def rows_where(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.timeout(600)
def test_gpu_check_dry_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "check"
    proc = gpu_check(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    assert (
        data["complete"]
        and data["dry_run"]
        and data["host"]["device"] == "cpu"
        and reported_items(data)
    )
    rows = data["rows"]
    assert {r["status"] for r in rows} <= {"ok", "error", "skipped"}
    # parity: the fixture's logits, and the released greedy tokens from every decoding mode
    checks = rows_where(rows, section="parity", case="fixture 8x8: logits")
    assert len(checks) == 3 and all(r["status"] == "ok" and r["value"] <= 1e-4 for r in checks)
    greedy = rows_where(rows, section="parity", case="fixture 8x8: greedy tokens")
    assert sorted(r["mode"] for r in greedy) == sorted(
        ["eager", "graph", "compiled", "compiled_graph"]
    )
    assert all(r["status"] == "ok" and r["check"] == "greedy tokens identical" for r in greedy)
    # decode: the goal case in every mode, tokens only and with VQ decoding, timed; bf16 agreement
    for mode in ("eager", "graph", "compiled", "compiled_graph"):
        for vq in (False, True):
            (r,) = rows_where(
                rows,
                section="decode",
                model="L",
                img=256,
                steps=20,
                batch=1,
                mode=mode,
                dtype="bf16",
                vq=vq,
            )
            assert r["status"] == "ok" and r["ms"] > 0 and r["runs"] >= 1 and r["img_s"] > 0
        (r,) = rows_where(
            rows,
            section="decode",
            model="L",
            img=256,
            steps=20,
            batch=1,
            mode=mode,
            dtype="bf16",
            vq=False,
        )
        assert (
            0 <= r["agreement_with"]["eager bf16"] <= 1
            and 0 <= r["agreement_with"]["eager fp32"] <= 1
        )
    # text-to-image: LPD-L width, a 120-token prompt, 1024 px (4,096 tokens in 64 steps)
    for mode in ("eager", "graph"):
        for vq in (False, True):
            (r,) = rows_where(rows, section="decode", model="T2I-L", img=1024, mode=mode, vq=vq)
            assert r["status"] == "ok" and r["ms"] > 0 and r["steps"] == 64 and r["batch"] == 1
            assert r["case"] == "T2I-L-1024 64 steps b1 120-token prompt"
            assert r["prompt_rows"] == 120 and r["tokens"] == 64  # 4,096 on the GPU (1024 px)
    # train: SDPA steps are timed; flex has no backward on a CPU, which is an error row that says so
    for r in rows_where(rows, section="train", attn="sdpa"):
        assert r["status"] == "ok" and r["ms"] > 0 and r["eval_loss"] > 0
    flex = rows_where(rows, section="train", attn="flex")
    assert len(flex) == 2 and all(
        r["status"] == "error" and "no backward pass on the CPU" in r["error"] for r in flex
    )
    assert [g["goal"] for g in data["goals"]][:2] == [
        "LPD-L-256 20 steps b1 bf16, tokens",
        "... with VQ decoding",
    ]
    assert data["goals"][0]["measured"] > 0 and isinstance(data["goals"][0]["met"], bool)
    # the table: printed, and as markdown with a line per row
    assert "section  case" in proc.stdout and "goals (dry run" in proc.stdout
    table = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and "flex" in table[-1] and "ERROR" in table[-1]
    assert (out / "table.md").read_text().startswith(
        "cpu: "
    ) and "- LPD-L-256 20 steps b1 bf16, tokens: " in (out / "table.md").read_text()
    assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_gpu_check_failing_section_is_an_error_row(tmp_path):
    repo = tmp_path / "released"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "lpd.py").write_text("raise ImportError('timm is not installed')\n")
    out = tmp_path / "check"
    proc = gpu_check(out, "--sections", "released", "--released_repo", str(repo))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["section"] for r in rows] == ["released"] * 3
    assert all(
        r["status"] == "error" and r["error"] == "ImportError: timm is not installed" for r in rows
    )
    assert "ERROR ImportError: timm is not installed" in proc.stdout


def reported_items(data):
    """Every planned item of every section has at least one row."""
    return {(r["section"], r["item"]) for r in data["rows"]} == {
        (name, i) for name, sec in data["sections"].items() for i in range(sec["planned"])
    }


@pytest.mark.timeout(600)
def test_gpu_check_keeps_to_its_budget(tmp_path):
    # gpu_check.py itself: the outer limit of gpu_check.sh (budget + 30 s) is wall-clock, and the
    # terminated test covers what happens when it strikes.
    out = tmp_path / "check"
    proc = run_process(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_check.py"),
            "--out",
            str(out),
            "--dry_run",
            "--sections",
            "parity,decode",
            "--budget_s",
            "2",
        ],
        400,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    assert (
        data["complete"] and list(data["sections"]) == ["parity", "decode"] and reported_items(data)
    )
    skipped = [r for r in data["rows"] if r["status"] == "skipped"]
    assert len(skipped) > len(data["rows"]) // 2
    assert all(
        " s left in this section" in r["error"] or "were used up" in r["error"] for r in skipped
    )


# gpu_check.py held in its second timed row until SIGTERM arrives (it writes the file HELD when it
# starts waiting): the signal cannot race the end of the run.
HELD_GPU_CHECK = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("gpu_check", {script!r})
    gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    timing, out = gpu_check.timing, sys.argv[sys.argv.index("--out") + 1]

    def held_timing(*a, **k):
        if os.path.exists(os.path.join(out, "results.json")):
            open({held!r}, "w").close()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # SIGTERM raises out of the sleep
                time.sleep(0.01)
        return timing(*a, **k)

    gpu_check.timing = held_timing
    sys.exit(gpu_check.main(sys.argv[1:]))
""")


def test_gpu_check_terminated_writes_what_it_has(tmp_path):
    out, held = tmp_path / "check", tmp_path / "held.py"
    held.write_text(
        HELD_GPU_CHECK.format(
            script=os.path.join(ROOT, "benchmarks", "gpu_check.py"), held=str(tmp_path / "held")
        )
    )
    cmd = [
        sys.executable,
        str(held),
        "--out",
        str(out),
        "--dry_run",
        "--sections",
        "decode",
        "--budget_s",
        "3600",
    ]
    with background(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    ) as proc:
        wait_for_file(tmp_path / "held", proc, 300, "the first row")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-3000:] + stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and data["rows"][0]["status"] == "ok" and reported_items(data)
    assert any("terminated" in (r.get("error") or "") for r in data["rows"])
    assert "stopped: terminated" in stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--released_repo", "/nonexistent/lpd"],
            "--released_repo /nonexistent/lpd has no models/lpd.py",
        ),
        (["--sections", "parity,speed"], "--sections must be a comma list"),
        (["--budget_s", "0"], "--budget_s must be a positive number"),
        (["--sections", "released"], "--sections released needs --released_repo"),
    ],
)
def test_gpu_check_usage_errors(tmp_path, flags, message):
    proc = run_process(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_check.py"),
            "--out",
            str(tmp_path / "o"),
            "--dry_run",
            *flags,
        ],
        120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_gpu_check_never_writes_into_earlier_results(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    proc = run_process(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_check.py"),
            "--out",
            str(tmp_path),
            "--dry_run",
        ],
        120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 2 and "is not an empty folder" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


def test_bench_sampling_draws_its_charts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_sampling", os.path.join(ROOT, "benchmarks", "bench_sampling.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = [
        {
            "model": "tiny",
            "batch": b,
            "steps": s,
            "cfg": 5.0,
            "dtype": "fp32",
            "compile": False,
            "vq": False,
            "wall_median_s": 0.01 * s * b,
            "images_per_s": 100.0 / s,
        }
        for b in (1, 8)
        for s in (8, 32)
    ]
    records[0]["released"] = {"wall_median_s": 0.2}
    paths = bench.draw_charts(records, str(tmp_path / "bs"))
    assert paths == [str(tmp_path / "bs_latency.png"), str(tmp_path / "bs_throughput.png")]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
