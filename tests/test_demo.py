"""The CPU demo end to end (shortened), its flag checks, the palette tokenizer behind it, and its charts."""

from __future__ import annotations

import json

import pytest

from lpd.tokenizer import make_tokenizer
from lpd.tokenizer.palette import PaletteTokenizer

PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--epochs",
    "1",
    "--max_train_samples",
    "32",
    "--classifier_epochs",
    "2",
    "--eval_bsz",
    "10",
    "--resamples",
    "50",
    "--model_config",
    json.dumps(
        {
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
            "vocab_size": 4,
            "class_num": 10,
            "proj_dropout": 0.0,
        }
    ),
]


def test_make_tokenizer_palette() -> None:
    tok = make_tokenizer("palette", vq_config={"levels": 4})
    assert isinstance(tok, PaletteTokenizer) and tok.levels == 4
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("pixels")


def test_shortened_demo_run_writes_its_outputs(tmp_path, capsys) -> None:
    from lpd.demo.run import main

    out = tmp_path / "demo"
    argv = [
        "--output_dir",
        str(out),
        "--steps",
        "8,20",
        "--orders",
        "lpd,raster",
        "--num_images",
        "20",
        "--edit_images",
        "12",
        "--edit_steps",
        "4",
        *TINY,
    ]
    assert main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= record["classifier_accuracy"] <= 1.0
    assert set(record["timings"]) == {"train", "judge", "ablation", "editing", "plot", "total"}
    edits = record["editing"]
    assert [(r["task"], r["order"], r["prefill"]) for r in edits[:3]] == [
        ("inpaint_bottom", "lpd", "one"),
        ("inpaint_bottom", "lpd", "schedule"),
        ("inpaint_bottom", "random", "one"),
    ]
    assert {r["task"] for r in edits} == {
        "inpaint_bottom",
        "inpaint_center",
        "outpaint",
        "class_edit",
    } and len(edits) == 12
    for r in edits:
        assert (
            r["num_images"] == 12
            and r["steps"] == 4
            and r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        )
        assert (out / "samples" / f"edit_{r['task']}.png").read_bytes()[:8] == PNG
    rows = record["ablation"]
    assert [(r["order"], r["steps"]) for r in rows] == [
        ("lpd", 8),
        ("lpd", 20),
        ("raster", 8),
        ("raster", 20),
    ]
    for r in rows:
        assert set(r) == {
            "order",
            "steps",
            "num_images",
            "accuracy",
            "accuracy_ci95",
            "frechet",
            "frechet_debiased",
            "frechet_ci95",
            "seconds",
        }
        assert r["num_images"] == 20 and r["seconds"] > 0
        assert 0.0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1.0
        assert r["frechet"] > 0 and r["frechet_ci95"][0] < r["frechet_ci95"][1]
    # a row is the judge's score of its setting's samples: digits 0-9 in turn, cfg 5 linear, tau_r 2
    _rescore_first_row(out, rows[0])
    printed = capsys.readouterr().out
    assert (
        "| lpd | 8 | " in printed
        and "accuracy [95% CI]" in printed
        and "| outpaint | lpd | schedule | 4 |" in printed
    )
    assert (out / "ablation.png").read_bytes()[:8] == PNG
    for order, steps in [("lpd", 8), ("raster", 20)]:
        assert (out / "samples" / f"{order}_steps{steps}.png").read_bytes()[:8] == PNG
    checkpoint = out / "train" / "checkpoint-last.pth"
    stamp = checkpoint.stat().st_mtime_ns
    # A second run reuses the finished training run and gives the same samples and scores.
    assert main(argv) == 0
    assert "reusing the trained model" in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again["ablation"]] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows
    ]
    assert checkpoint.stat().st_mtime_ns == stamp
    # Other training settings into the same folder: refused, the finished run kept.
    assert main([*argv, "--seed", "1"]) == 2
    assert "holds a training run of other settings" in capsys.readouterr().err
    assert checkpoint.stat().st_mtime_ns == stamp


def _rescore_first_row(out, row) -> None:
    import numpy as np
    import torch

    from lpd.demo.classifier import Judge, train_classifier
    from lpd.evaluate import RunSpec, generate_images
    from lpd.models import load_lpd
    from lpd.sampling import SamplingConfig
    from lpd.schedules import group_sizes

    model, labels = load_lpd(out / "train" / "checkpoint-last.pth"), np.arange(20) % 10
    judge = Judge.held_out(train_classifier(seed=0, epochs=2), resamples=50, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo samples and scores with --decode_threads 1
    try:
        palette = make_tokenizer("palette", vq_config={"levels": 4})
        sampling = SamplingConfig(cfg=5.0, repulsion_threshold=2.0, order="lpd")
        images = generate_images(
            model,
            palette,
            RunSpec(20, group_sizes(256, 8), labels=labels, seed=0, eval_bsz=10),
            sampling,
        ).images
        want = judge.score(images, labels)
    finally:
        torch.set_num_threads(threads)
    assert (row["order"], row["steps"]) == ("lpd", 8)
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--orders", "lpd,zigzag"], "--orders"),
        (["--steps", "8,0"], "--steps"),
        (["--num_images", "1"], "--num_images must be at least 2"),
        (["--resamples", "0"], "--resamples must be at least 1"),
    ],
)
def test_bad_flags_exit_2_before_any_work(tmp_path, capsys, flags, message) -> None:
    from lpd.demo.run import main

    assert main(["--output_dir", str(tmp_path / "demo"), *TINY, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_line_chart_draws_error_bars_and_log_axes(tmp_path) -> None:
    from lpd.plotting import line_chart

    path = tmp_path / "chart.png"
    line_chart(
        path,
        [
            {
                "series": {
                    "a": [(8, 0.5, 0.4, 0.6), (256, 0.7, 0.65, 0.72)],
                    "b": [(8, 0.3), (256, None)],
                },
                "title": "t",
                "xlabel": "steps",
                "ylabel": "y",
                "log_x": True,
            },
            {"series": {"b": [(1, 2.0), (2, 3.0)]}},
        ],
        title="two panels",
        panel_size=(300, 200),
    )
    assert path.read_bytes()[:8] == PNG
    from PIL import Image

    assert Image.open(path).size == (600, 260)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically
