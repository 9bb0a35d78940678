"""The README's shell commands up to the program they launch: the training, caching, evaluation,
order and demo scripts and environment_setup.sh run with stand-in launchers (``torchrun``,
``python``, ``pip``) that record their command lines, which must then parse through the real entry
points into the settings the README promises. The order script's commands run for real, as do the
two benchmark scripts the README names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import main_eval
import main_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDER = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:2] == ["-c"]:  # an import check: everything is installed, unless FAKE_NO_TORCH
    sys.exit(1 if os.environ.get("FAKE_NO_TORCH") and "torchvision" in sys.argv[2] else 0)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if sys.argv[1:3] == ["-m", "venv"]:  # python -m venv PATH: a venv whose python records too
    os.makedirs(os.path.join(sys.argv[3], "bin"))
    with open(os.path.join(sys.argv[3], "bin", "python"), "w") as f:
        f.write(open(__file__).read())
    os.chmod(os.path.join(sys.argv[3], "bin", "python"), 0o755)
"""


def recorder(folder, name: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(RECORDER)
    os.chmod(path, 0o755)
    return path


def run_script(
    tmp_path, script: str, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """``bash script args`` with ``torchrun`` recorded; returns the process and the recorded command
    lines."""
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    recorder(tmp_path / "bin", "torchrun")
    full = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(log),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **env,
    )
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, script), *args],
        env=full,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def split_torchrun(call: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """``torchrun --a=1 --b 2 script.py args`` -> ({a: 1, b: 2}, script.py, args)."""
    assert call[0] == "torchrun"
    flags, i = {}, 1
    while call[i].startswith("--"):
        key, eq, value = call[i][2:].partition("=")
        flags[key], i = (value, i + 1) if eq else (call[i + 1], i + 2)
    return flags, call[i], call[i + 1 :]


@pytest.mark.parametrize(
    "name, extra",
    [
        ("l_256", ["--cached_path", "data/imagenet_tokens_256"]),
        ("xl_256", []),
        ("xxl_256", []),
        ("l_512", ["--pretrained_ckpt", "outputs/lpd_l_256/checkpoint-last.pth"]),
        ("xl_512", []),
    ],
)
def test_training_scripts_launch_the_released_recipe_on_every_node(tmp_path, name, extra):
    proc, calls = run_script(
        tmp_path,
        f"scripts/train/lpd_{name}.sh",
        *extra,
        "--output_dir",
        "O",
        NODE_RANK="2",
        MASTER_ADDR="host0",
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    flags, script, argv = split_torchrun(call)
    assert script == "main_train.py" and (flags["node_rank"], flags["master_addr"]) == (
        "2",
        "host0",
    )
    c = main_train.parse_config(argv)
    c.validate()
    assert (c.model, c.img_size) == (f"lpd_{name.split('_')[0]}", int(name.split("_")[1]))
    assert (
        c.batch_size * int(flags["nnodes"]) * int(flags["nproc_per_node"]) == 2048
    )  # the global batch
    assert c.auto_resume and c.use_cached and c.output_dir == "O" and c.bf16 and c.blr == 1e-4
    assert c.cached_path == f"data/imagenet_tokens_{c.img_size}"  # where cache_imagenet.sh writes
    if "--pretrained_ckpt" in extra:
        assert c.pretrained_ckpt == extra[1]


def test_cache_script_launches_main_cache_into_the_training_configs_cache(tmp_path, capsys):
    import main_cache
    from lpd.config import parse_args_with_config

    proc, calls = run_script(
        tmp_path,
        "scripts/train/cache_imagenet.sh",
        "256",
        "--cache_format",
        "released",
        IMAGENET="/data/imagenet",
        NPROC_PER_NODE="4",
    )
    assert proc.returncode == 0, proc.stderr
    flags, script, argv = split_torchrun(calls[0])
    assert script == "main_cache.py" and flags["nproc_per_node"] == "4"
    args = parse_args_with_config(main_cache.get_args_parser(), argv)
    assert (args.img_size, args.data_path, args.cache_format) == (256, "/data/imagenet", "released")
    assert (
        args.cached_path == "data/imagenet_tokens_256"
        and args.vqgan_path == "tokenizers/vq_ds16_c2i.pt"
    )
    proc, calls = run_script(tmp_path, "scripts/train/cache_imagenet.sh", "256")
    assert proc.returncode != 0 and "set IMAGENET" in proc.stderr and not calls


@pytest.mark.parametrize(
    "name",
    [
        "l_256_20steps",
        "xl_256_20steps",
        "xxl_256_20steps",
        "l_256_32steps",
        "xl_256_32steps",
        "l_512_48steps",
        "xl_512_48steps",
    ],
)
def test_evaluation_scripts_launch_main_eval_with_their_config(tmp_path, name):
    proc, calls = run_script(
        tmp_path, f"scripts/eval/lpd_{name}.sh", "--output_dir", "/data/eval", NGPUS="4"
    )
    assert proc.returncode == 0, proc.stderr
    flags, script, argv = split_torchrun(calls[0])
    assert script == "main_eval.py" and flags["nproc_per_node"] == "4"
    args = main_eval.parse_args_with_config(main_eval.build_parser(), argv)
    main_eval.check_args(args, argv)
    assert (
        args.model == f"lpd_{name.split('_')[0]}"
        and args.output_dir == "/data/eval"
        and args.num_images == 50000
    )


def test_order_script_writes_the_four_released_settings(tmp_path):
    from lpd.orders import load_orders, lpd_orders
    from lpd.orders.cli import main as orders_main
    from lpd.schedules import group_sizes

    out = tmp_path / "generated"
    proc, calls = run_script(
        tmp_path,
        "orders/run_lpd_order.sh",
        PYTHON=recorder(tmp_path / "py", "python"),
        NUM="2",
        OUT=str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert [c[1:3] for c in calls] == [["-m", "lpd.orders"]] * 4
    for call in calls:
        assert orders_main(call[3:]) == 0  # the command itself, in this process
    settings = {
        "res256_steps20_repulsion2": (256, 20, 2.0),
        "res256_steps20_repulsion3": (256, 20, 3.0),
        "res256_steps32_repulsion2": (256, 32, 2.0),
        "res512_steps48_repulsion4": (512, 48, 4.0),
    }
    assert sorted(os.listdir(out)) == sorted(f"{n}.json" for n in settings)
    for name, (img, steps, tr) in settings.items():
        grid = img // 16
        got = load_orders(str(out / f"{name}.json"), 2, grid)
        assert np.array_equal(got, lpd_orders(2, group_sizes(img, steps), grid, 1.0, tr, seed=0))


def test_demo_script_runs_the_demo_in_the_active_environment(tmp_path):
    venv = tmp_path / "venv"
    recorder(venv / "bin", "python")
    proc, calls = run_script(
        tmp_path, "scripts/demo.sh", "out/demo-check", "--epochs", "1", VIRTUAL_ENV=str(venv)
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        ["python", "-m", "lpd.demo", "--output_dir", "out/demo-check", "--epochs", "1"]
    ]
    proc, calls = run_script(tmp_path, "scripts/demo.sh", VIRTUAL_ENV=str(venv))
    assert calls == [["python", "-m", "lpd.demo", "--output_dir", "outputs/demo"]]
    t2i = ["python", "-m", "lpd.demo", "--task", "t2i", "--threads", "2", "--output_dir"]
    _, got = run_script(tmp_path, "scripts/demo.sh", "--t2i", VIRTUAL_ENV=str(venv))
    _, flags = run_script(tmp_path, "scripts/demo.sh", "--t2i", "--cfg", "3", VIRTUAL_ENV=str(venv))
    assert got == [[*t2i, "outputs/demo_t2i"]] and flags == [
        [*t2i, "outputs/demo_t2i", "--cfg", "3"]
    ]
    from lpd.config import parse_args_with_config
    from lpd.demo.run import build_parser

    args = parse_args_with_config(build_parser(), calls[0][3:])
    assert (
        args.output_dir == "outputs/demo"
        and args.num_images == 500
        and args.steps == [8, 12, 20, 32, 256]
    )


def test_environment_setup_is_idempotent_and_installs_where_asked(tmp_path):
    """A given path, an active virtual environment, or a new one; PyTorch only when missing
    (LPD_TORCH_SPEC picks it); the package with its default extras (test, t2i, app), editable; a second run does the
    same again and creates nothing."""
    venv = tmp_path / "env"
    recorder(venv / "bin", "python")
    pip_upgrade, install = (
        ["-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["-m", "pip", "install", "-q", "-e", f"{ROOT}[test,t2i,app]"],
    )
    for _ in range(2):
        proc, calls = run_script(tmp_path, "environment_setup.sh", str(venv))
        assert proc.returncode == 0, proc.stderr
        assert (
            calls == [["python", *pip_upgrade], ["python", *install]]
            and "creating" not in proc.stdout
        )
    proc, calls = run_script(
        tmp_path,
        "environment_setup.sh",
        VIRTUAL_ENV=str(venv),
        FAKE_NO_TORCH="1",
        LPD_EXTRAS="",
        LPD_TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124",
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        ["python", *pip_upgrade],
        [
            "python",
            "-m",
            "pip",
            "install",
            "-q",
            "torch",
            "torchvision",
            "--index-url",
            "https://download.pytorch.org/whl/cu124",
        ],
        ["python", *install[:-1], ROOT],
    ]
    fresh = tmp_path / "fresh"
    proc, calls = run_script(
        tmp_path, "environment_setup.sh", str(fresh), PYTHON=recorder(tmp_path / "sys", "python3")
    )
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == ["python3", "-m", "venv", str(fresh)] and calls[1:] == [
        ["python", *pip_upgrade],
        ["python", *install],
    ]
    assert f"creating virtual environment at {fresh}" in proc.stdout


def test_benchmark_scripts_for_orders_and_training_run(tmp_path):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for script, args in (
        ("bench_orders.py", ["--num_256", "4", "--num_512", "2", "--repeats", "1"]),
        (
            "bench_train.py",
            [
                "--device",
                "cpu",
                "--threads",
                "1",
                "--models",
                "tiny",
                "--batch",
                "2",
                "--reps",
                "1",
                "--warmup",
                "0",
                "--optimizer",
                "adamw",
                "--attn",
                "sdpa",
                "--no_memory",
            ],
        ),
    ):
        out = tmp_path / f"{script}.json"
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "benchmarks", script),
                *args,
                "--output_json",
                str(out),
            ],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            json.loads(out.read_text()) and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        )


def test_python_m_lpd_schedules_writes_the_shipped_released_tables(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "lpd.schedules", "write", str(tmp_path / "orders")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    written = sorted(
        os.path.relpath(line.removeprefix("wrote "), tmp_path / "orders")
        for line in proc.stdout.splitlines()
    )
    assert written == [
        "group_sizes_lookup.json",
        "group_sizes_training/group_sizes_256.json",
        "group_sizes_training/group_sizes_512.json",
    ]
    for rel in written:
        with open(os.path.join(ROOT, "orders", rel)) as shipped:
            assert (tmp_path / "orders" / rel).read_text() == shipped.read()


def test_the_demo_config_is_the_readme_testbed():
    """configs/demo.yaml: a 0.22M-parameter LPD on the 16x16 grid of 256 px, trained 10 epochs on
    the nine released 256 px schedules, a 4-level palette; 500 samples per order x steps setting at
    cfg 5 (linear), 1,000 resamples per interval, 8-step edits of the lower half, the centre box,
    around the centre box and all but the left third."""
    from lpd.config import parse_args_with_config
    from lpd.demo.run import build_parser, edit_keep_masks
    from lpd.models import LPD, LPDConfig

    a = parse_args_with_config(build_parser(), [])
    model = LPD(LPDConfig.from_name(a.model, a.img_size, **a.model_config))
    assert (
        round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.22 and model.grid_size == 16
    )
    assert (a.epochs, a.group_sizes_list, a.tokenizer, a.vq_config) == (
        10,
        None,
        "palette",
        {"levels": 4},
    )
    assert (a.orders, a.steps, a.num_images, a.resamples) == (
        ["lpd", "random", "raster"],
        [8, 12, 20, 32, 256],
        500,
        1000,
    )
    assert (a.cfg, a.cfg_schedule, a.edit_steps, a.edit_images) == (5.0, "linear", 8, 0)
    keep = {k: v.reshape(16, 16) for k, v in edit_keep_masks(16).items()}
    box = np.zeros((16, 16), bool)
    box[4:12, 4:12] = True
    assert keep["inpaint_bottom"][:8].all() and not keep["inpaint_bottom"][8:].any()
    assert np.array_equal(keep["inpaint_center"], ~box) and np.array_equal(keep["outpaint"], box)
    assert keep["class_edit"][:, :5].all() and not keep["class_edit"][:, 5:].any()


def test_the_readme_edit_command_for_a_released_model_is_accepted_and_needs_its_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """``python -m lpd.edit --model lpd_l ...`` as the README writes it: offline and without the
    released checkpoint it names the Hub repository and the flag to use, writes nothing and shows no
    traceback (its success path is the demo-model command's: tests/test_editing.py)."""
    from PIL import Image

    from lpd.edit import main

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "in.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    argv = (
        "--model lpd_l --img_size 256 --image in.png --region center --label 207 --steps 12 "
        "--num 4 --seed 0 --output edited.png"
    )
    assert main(argv.split()) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "mit-han-lab/lpd_l_256" in err
        and "--pretrained_ckpt" in err
        and "Traceback" not in err
    )
    assert not list(tmp_path.glob("edited*"))


def _readme_commands() -> list[list[str]]:
    import re
    import shlex

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
        for line in block.replace("\\\n", " ").splitlines()
    ]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_the_readme_command_lines_of_the_entry_points_parse_into_what_they_say():
    import main_cache
    from lpd.config import parse_args_with_config
    from lpd.orders.cli import build_parser as orders_parser

    seen = {}
    for words in _readme_commands():
        if "main_eval.py" in words:
            argv = words[words.index("main_eval.py") + 1 :]
            args = main_eval.parse_args_with_config(main_eval.build_parser(), argv)
            sampling, _ = main_eval.check_args(args, argv)  # cfg not given: the paper's
            seen.setdefault("eval", []).append(
                (args.model, args.generation_steps, sampling.cfg, args.bf16, args.use_ema)
            )
        elif "main_train.py" in words and "scripts/slurm.py" not in words:
            c = main_train.parse_config(words[words.index("main_train.py") + 1 :])
            c.validate()
            seen.setdefault("train", []).append(
                (c.model, c.fsdp, c.ema_decay, c.use_cached, c.cached_path, c.auto_resume)
            )
        elif "main_cache.py" in words:
            args = parse_args_with_config(
                main_cache.get_args_parser(),
                words[words.index("main_cache.py") + 1 :],
                also_known=main_train.get_args_parser(),
            )
            seen.setdefault("cache", []).append((args.data_path, args.cached_path, args.img_size))
        elif words[:3] == ["python", "-m", "lpd.orders"]:
            args = orders_parser().parse_args(words[3:])
            seen.setdefault("orders", []).append(
                (args.img_size, args.generation_steps, args.repulsion_threshold, args.visualize)
            )
    assert seen["eval"] == [("lpd_l", 20, 4.8, True, False), ("lpd_xxl", 20, 5.9, False, True)]
    assert seen["train"] == [
        ("lpd_tiny", False, None, True, "/tmp/cache", False),  # no EMA (a resumed one is kept)
        ("lpd_xxl", True, 0.9999, True, "CACHE", True),
        ("lpd_l", False, 0.9999, True, "CACHE", True),  # text-to-image, configs/train_t2i_256.yaml
        ("lpd_l", False, 0.9999, False, "data/t2i_tokens_256", True),  # ... from tar shards
    ]
    assert seen["cache"] == [("IMAGES", "/tmp/cache", 256), ("DATA", "CACHE", 256)]
    assert seen["orders"] == [(256, 20, 2.0, False), (256, 20, 2.0, True)]
