"""A newcomer's first hour: every --help shows the defaults, the defaults agree between main_eval.py,
lpd.pipeline and lpd.edit, --num_workers follows the cores at hand, the CPU smoke test's config trains
visibly, and the README says which python to run, where its figures come from and what to cite."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_cache  # noqa: E402
import main_eval  # noqa: E402
import main_train  # noqa: E402
from lpd import edit, metrics, pipeline  # noqa: E402
from lpd.demo import run as demo  # noqa: E402
from lpd.devices import available_cpus  # noqa: E402
from lpd.models import LPD, LPDConfig  # noqa: E402
from lpd.orders import cli as orders_cli  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PARSERS = {
    "main_eval.py": main_eval.build_parser,
    "main_train.py": main_train.get_args_parser,
    "main_cache.py": main_cache.get_args_parser,
    "lpd.pipeline": pipeline.build_parser,
    "lpd.edit": edit.build_parser,
    "lpd.metrics": metrics._parser,
    "lpd.orders": orders_cli.build_parser,
    "lpd.demo": demo.build_parser,
}


def _without_default(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose --help line does not show their (not None, not off) default."""
    formatter, missing = parser._get_formatter(), []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            missing += [m for sub in a.choices.values() for m in _without_default(sub)]
        elif (
            a.option_strings
            and a.help != argparse.SUPPRESS
            and not (a.default is None or a.default is False or a.default == argparse.SUPPRESS)
        ):
            if "default" not in formatter._format_action(a):
                missing.append(a.option_strings[0])
    return missing


@pytest.mark.parametrize("entry", sorted(PARSERS))
def test_every_help_shows_the_defaults(entry):
    parser = PARSERS[entry]()
    assert _without_default(parser) == []
    text = parser.format_help()
    if entry == "main_eval.py":
        assert "images per forward pass and process (default: 64)" in " ".join(text.split())
        assert "the paper's for the model, size and steps; else 1.0" in " ".join(text.split())


def test_num_workers_default_to_the_cores_this_process_may_use():
    want = min(4, available_cpus())
    assert want == min(4, len(os.sched_getaffinity(0)))
    assert main_train.get_args_parser().parse_args([]).num_workers == want
    assert main_cache.get_args_parser().parse_args([]).num_workers == want
    # pinned to one core (as by taskset or a Slurm task), the default is 1
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from lpd.train import TrainConfig; "
        "print(TrainConfig().num_workers)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]


@pytest.mark.parametrize("row", sorted(pipeline.PAPER_SETTINGS))
def test_main_eval_and_edit_default_to_the_pipelines_paper_settings(row, tmp_path):
    model, size, steps = row
    pipe = pipeline.LPDPipeline(
        LPD(LPDConfig(img_size=size, embed_dim=8, depth=1, num_heads=2, vocab_size=4, class_num=2)),
        torch.nn.Identity(),
        name=model,
    )
    want = pipe.sampling(steps)
    args = main_eval.parse_args(
        ["--model", model, "--img_size", str(size), "--generation_steps", str(steps)]
    )
    got = main_eval.sampling_for(args, size, steps)
    assert (
        (got.cfg, got.repulsion_threshold)
        == (want.cfg, want.repulsion_threshold)
        == pipeline.PAPER_SETTINGS[row][::-1]
    )
    # explicit flags and config values win over the paper's
    args = main_eval.parse_args(["--model", model, "--img_size", str(size), "--cfg", "3.0"])
    assert main_eval.sampling_for(args, size, steps).cfg == 3.0 == pipe.sampling(steps, cfg=3.0).cfg
    (tmp_path / "c.yaml").write_text(f"model: {model}\nrepulsion_threshold: 1.5\n")
    args = main_eval.parse_args(["--config", str(tmp_path / "c.yaml"), "--img_size", str(size)])
    assert main_eval.sampling_for(args, size, steps).repulsion_threshold == 1.5
    # lpd.edit leaves both to the pipeline of --model (the paper's 20-step values)
    edit_args = edit.build_parser().parse_args(
        ["--model", model, "--image", "x.png", "--region", "center"]
    )
    assert edit_args.cfg is None and edit_args.repulsion_threshold is None


def test_main_eval_without_a_paper_row_keeps_the_sampling_defaults():
    args = main_eval.parse_args(["--config", TINY, "--random_init"])  # lpd_tiny: no paper row
    s = main_eval.sampling_for(args, 256, 20)
    assert (s.cfg, s.repulsion_threshold) == (1.0, 1.0)


class _Tokens(torch.utils.data.Dataset):
    """Eight token images of four patterns (and their mirrors), labelled by pattern."""

    def __init__(self) -> None:
        base = torch.randint(0, 16384, (4, 256), generator=torch.Generator().manual_seed(0))
        self.items = [(torch.stack([base[i % 4], base[i % 4].flip(0)]), i % 4) for i in range(8)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_the_smoke_test_config_trains_visibly(tmp_path):
    from lpd.distributed import DistInfo
    from lpd.recipe import lr_at
    from lpd.train import train

    # the README's CPU smoke test: configs/tiny.yaml, 3 epochs of batch 4 (here 2 steps each, one process)
    config = main_train.parse_config(
        [
            "--config",
            TINY,
            "--use_cached",
            "--cached_path",
            str(tmp_path),
            "--epochs",
            "3",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--device",
            "cpu",
            "--save_every_steps",
            "0",
            "--save_every_epochs",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert (
        lr_at(1 / 2, config.lr, epochs=3, warmup_epochs=config.warmup_epochs) >= 1e-3
    )  # not 3e-6 for 50 epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            config, info=DistInfo(0, 1, torch.device("cpu")), dataset=_Tokens(), log=lambda *_: None
        )
    finally:
        torch.set_num_threads(threads)
    assert len(result.losses) == 6 and result.losses[0] > 9.6  # ln(16384) = 9.70 at the start
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_readme_runs_the_environments_python():
    text = _readme()
    activate = text.index("source .venv/bin/activate")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [
        line for b in blocks for line in b.splitlines() if re.match(r"\s*(python|torchrun)\b", line)
    ]
    assert commands and activate < text.index(
        commands[0]
    )  # activation comes before the first bare python
    inline = re.findall(r"`((?:python|torchrun) [^`]*)`", text)
    assert inline and activate < text.index(inline[0])


def test_the_readme_says_where_its_figures_come_from_and_what_to_cite():
    text = _readme()
    assert (
        "Intel(R) Xeon(R)" in text and "2 cores" in text
    )  # the machine of this README's CPU figures
    flat = " ".join(text.split())
    assert (
        "every GPU figure quoted are the paper's" in flat
        and "https://arxiv.org/abs/2507.01957" in text
    )
    bib = text[text.index("@inproceedings{") :]
    for part in (
        "Locality-aware Parallel Decoding for Efficient Autoregressive Image Generation",
        "Zhang, Zhuoyang",
        "Huang, Luke J.",
        "Wu, Chengyue",
        "Yang, Shang",
        "Peng, Kelly",
        "Lu, Yao",
        "Han, Song",
        "2507.01957",
    ):
        assert part in bib, part
    assert (
        yaml.safe_load(open(TINY))["warmup_epochs"] < 1
    )  # the smoke test's config: no 50-epoch warm-up
