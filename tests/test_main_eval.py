"""main_eval.py end to end on a CPU: the tiny config, 1 process against torchrun with 2 processes,
resuming, released-format checkpoints, the metrics path, the paper's configs and clear errors.

Byte-identical PNGs need the same kernels in every process; on the CPU that means the same number
of threads (torchrun gives each process OMP_NUM_THREADS=1), so the single-process runs here use one
thread as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import run_process  # noqa: E402

import main_eval  # noqa: E402
from lpd.evaluate import EvaluationError, read_png  # noqa: E402
from lpd.files import CheckpointError  # noqa: E402
from lpd.models import LPD, LPDConfig  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
TINY = [
    "--config",
    TINY_CONFIG,
    "--random_init",
    "--num_images",
    "20",
    "--eval_bsz",
    "5",
    "--generation_steps",
    "20",
    "--order",
    "lpd",
    "--cfg",
    "2.0",
    "--seed",
    "0",
    "--no_fid",
    "--no_progress",
]
RUN = "lpd_tiny-randinit-res256-steps20-cfg2.0-lpd-tr1.0-n20-seed0"


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_main(argv: list[str]) -> dict:
    with threads(1):
        return main_eval.run(main_eval.parse_args(argv), argv)


def png_bytes(folder: str) -> dict[str, bytes]:
    return {
        f: open(os.path.join(folder, f), "rb").read()
        for f in sorted(os.listdir(folder))
        if f.endswith(".png")
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    record = run_main(TINY + ["--output_dir", out])
    run_dir = os.path.join(out, RUN)
    return run_dir, record, png_bytes(os.path.join(run_dir, "images"))


def test_single_process_writes_the_run_folder(single):
    run_dir, record, pngs = single
    assert sorted(pngs) == [f"{i:06d}.png" for i in range(20)]
    assert sorted(os.listdir(run_dir)) == sorted(
        [
            ".lock",
            "images",
            f"{RUN}.npz",
            "metrics.json",
            "samples_grid.png",
            "settings.json",
            "tokens.npy",
        ]
    )  # .lock: held while one writes
    with np.load(os.path.join(run_dir, f"{RUN}.npz")) as data:
        arr = data["arr_0"]
    assert arr.shape == (20, 256, 256, 3) and arr.dtype == np.uint8
    for i in range(20):  # the .npz holds exactly the PNGs' pixels
        assert np.array_equal(arr[i], read_png(os.path.join(run_dir, "images", f"{i:06d}.png")))
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert m["fid"] is None and m["num_images"] == 20 and m["generated_this_run"] == 20
    assert (
        m["settings"]["cfg"] == 2.0
        and m["settings"]["model"] == "lpd_tiny-randinit"
        and len(m["settings"]["weights_sha256"]) == 64
    )
    assert (
        m["dtype"] == "float32"
        and m["device"].startswith("cpu")
        and m["versions"]["torch"] == torch.__version__
    )
    assert np.load(os.path.join(run_dir, "tokens.npy")).min() >= 0
    speed = m["speed"]
    assert speed["timed_batches"] == 3  # 4 batches, the first is the warm-up
    for key in ("tokens", "tokens_and_decode"):
        assert speed[key]["images_per_s"] > 0 and speed[key]["s_per_image"] > 0
    assert speed["tokens"]["s_per_image"] < speed["tokens_and_decode"]["s_per_image"]
    assert m == json.loads(json.dumps(record, default=str))  # metrics.json is the record returned


@pytest.mark.timeout(900)
def test_torchrun_two_processes_write_the_same_bytes(single, tmp_path):
    _, _, pngs = single
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "main_eval.py"),
        *TINY,
        "--output_dir",
        str(tmp_path),
    ]
    proc = run_process(cmd, 600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / RUN
    assert png_bytes(str(run_dir / "images")) == pngs
    assert np.array_equal(
        np.load(run_dir / "tokens.npy"), np.load(os.path.join(single[0], "tokens.npy"))
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["speed"]["processes"] == 2 and m["generated_this_run"] == 20
    with np.load(run_dir / f"{RUN}.npz") as data:
        assert np.array_equal(data["arr_0"][7], read_png(run_dir / "images" / "000007.png"))


def test_rerun_brings_back_deleted_images_byte_for_byte(single):
    run_dir, _, pngs = single
    images = os.path.join(run_dir, "images")
    for name in ("000011.png", "000013.png"):
        os.remove(os.path.join(images, name))
    with open(os.path.join(images, "000012.png"), "r+b") as f:
        f.truncate(100)  # an unreadable file is sampled again too
    record = run_main(TINY + ["--output_dir", os.path.dirname(run_dir)])
    assert record["generated_this_run"] == 3 and record["found_on_disk"] == 17
    assert png_bytes(images) == pngs


def test_a_rerun_with_other_settings_is_refused(single):
    run_dir, _, _ = single
    argv = TINY + [
        "--output_dir",
        os.path.dirname(run_dir),
        "--run_name",
        RUN,
        "--temperature",
        "0.5",
    ]
    with pytest.raises(EvaluationError, match="temperature: 1.0 on disk vs 0.5 now"):
        run_main(argv)


# ------------------------------------------------------------------------------ checkpoints


def tiny_released_checkpoint(path: str, seed: int = 0) -> None:
    """A checkpoint as the released training code writes it (no model_config; args Namespace)."""
    cfg = yaml.safe_load(open(TINY_CONFIG))
    model = LPD(LPDConfig.from_name("lpd_tiny", 256, **cfg["model_config"]))
    model.initialize_weights(torch.Generator().manual_seed(seed))
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 7,
            "args": argparse.Namespace(model="lpd_tiny", img_size=256, vqgan_stride=16),
        },
        path,
    )


def fake_hub_cache(root, repo: str, filename: str, make) -> None:
    """The layout huggingface_hub keeps: models--ORG--NAME/snapshots/<commit>/<file> and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    make(str(folder / "snapshots" / commit / filename))


def test_released_format_checkpoint_from_a_path_or_the_hub_cache(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "lpd_tiny_256.pth")
    tiny_released_checkpoint(ckpt)
    common = [
        "--config",
        TINY_CONFIG,
        "--num_images",
        "2",
        "--eval_bsz",
        "2",
        "--generation_steps",
        "8",
        "--cfg",
        "1.5",
        "--seed",
        "0",
        "--no_fid",
        "--no_progress",
        "--output_dir",
        str(tmp_path),
    ]
    a = run_main(common + ["--pretrained_ckpt", ckpt])
    assert a["settings"]["model"] == "lpd_tiny"  # the --model of tiny.yaml
    # Offline, by name, from a filled Hugging Face cache (the file is the tiny model; model_config
    # from tiny.yaml shrinks the lpd_l preset to it).
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "mit-han-lab/lpd_l_256", "lpd_l_256.pth", tiny_released_checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    b = run_main(common + ["--model", "lpd_l", "--img_size", "256"])
    assert (
        b["settings"]["model"] == "lpd_l"
        and b["settings"]["weights_sha256"] == a["settings"]["weights_sha256"]
    )
    c = run_main(common + ["--random_init"])  # the same weights, drawn from the seed
    da, db, dc = a["files"]["images"], b["files"]["images"], c["files"]["images"]
    assert len({da, db, dc}) == 3 and len(png_bytes(da)) == 2
    assert png_bytes(da) == png_bytes(db) == png_bytes(dc)


def test_wrong_img_size_for_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "lpd_tiny_256.pth")
    tiny_released_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="trained at 256 px"):
        run_main(
            [
                "--config",
                TINY_CONFIG,
                "--pretrained_ckpt",
                ckpt,
                "--img_size",
                "512",
                "--no_fid",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_offline_names_file_repository_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        run_main(
            [
                "--model",
                "lpd_l",
                "--img_size",
                "256",
                "--no_fid",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    msg = str(info.value)
    assert (
        "mit-han-lab/lpd_l_256" in msg
        and "--pretrained_ckpt" in msg
        and str(tmp_path / "hf") in msg
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_main(["--model", "lpd_l", "--pretrained_ckpt", str(tmp_path / "nope.pth"), "--no_fid"])


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--top_p", "1.5"], "top_p"),
        (["--top_p", "0"], "top_p"),
        (["--cfg", "-1"], "cfg"),
        (["--temperature", "-0.5"], "temperature"),
        (["--top_k", "-3"], "top_k"),
        (["--eval_bsz", "0"], "eval_bsz"),
        (["--num_images", "-5"], "num_images"),
        (["--order", "random", "--lpd_order_file", "x.json"], "--lpd_order_file"),
    ],
)
def test_bad_sampling_flags_fail_before_loading_anything(flags, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_main(TINY + ["--output_dir", str(tmp_path)] + flags)
    assert os.listdir(tmp_path) == []


def test_bad_group_sizes(tmp_path):
    with pytest.raises(ValueError, match="sum to 3"):
        run_main(
            TINY
            + ["--output_dir", str(tmp_path), "--group_sizes", "1,2", "--generation_steps", "2"]
        )


def test_missing_order_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.json"):
        run_main(
            TINY + ["--output_dir", str(tmp_path), "--lpd_order_file", str(tmp_path / "none.json")]
        )


def test_bad_order_file_names_the_row(tmp_path):
    rows = [list(range(256)) for _ in range(20)]
    rows[4][0] = 1  # not a permutation
    path = tmp_path / "orders.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="row 4"):
        run_main(TINY + ["--output_dir", str(tmp_path / "out"), "--lpd_order_file", str(path)])
    short = tmp_path / "short.json"
    short.write_text(json.dumps(rows[:3]))
    with pytest.raises(ValueError):
        run_main(TINY + ["--output_dir", str(tmp_path / "out"), "--lpd_order_file", str(short)])
    assert not (tmp_path / "out").exists()


def test_missing_stats_or_inception_weights_fail_before_sampling(tmp_path):
    argv = [a for a in TINY if a != "--no_fid"] + ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        run_main(argv + ["--fid_stats", str(tmp_path / "adm_in256_stats.npz")])
    from lpd.metrics import save_statistics

    save_statistics(tmp_path / "stats.npz", np.zeros(4), np.eye(4))
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        run_main(
            argv
            + [
                "--fid_stats",
                str(tmp_path / "stats.npz"),
                "--inception_weights",
                str(tmp_path / "w.pth"),
            ]
        )
    assert not (tmp_path / "out" / RUN / "images").exists() or not os.listdir(
        tmp_path / "out" / RUN / "images"
    )


@pytest.mark.filterwarnings("ignore:only 4 images")
def test_metrics_through_the_command_line_with_a_stand_in_extractor(tmp_path, monkeypatch):
    from lpd import metrics as M

    def stand_in(weights_path=None, device="cpu", **_):
        def extract(images: torch.Tensor):
            x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
            return x, 3 * x @ torch.linspace(-1, 1, 12 * 5).reshape(12, 5)

        return extract

    monkeypatch.setattr(M, "inception_extractor", stand_in)
    monkeypatch.setattr(
        M, "resolve_inception_weights", lambda path=None, **_: str(tmp_path / "unused.pth")
    )
    rng = np.random.RandomState(0)
    M.save_statistics(tmp_path / "ref.npz", rng.rand(12), np.eye(12) * 0.01)
    argv = [a for a in TINY if a != "--no_fid"]
    argv[argv.index("--num_images") + 1] = "4"
    argv[argv.index("--eval_bsz") + 1] = "4"
    record = run_main(
        argv + ["--fid_stats", str(tmp_path / "ref.npz"), "--output_dir", str(tmp_path / "out")]
    )
    assert record["fid"] > 0 and record["inception_score"] >= 1.0
    m = json.loads(open(record["files"]["metrics"]).read())
    assert m["fid"] == record["fid"] and m["ref_stats"] == str(tmp_path / "ref.npz")


# ------------------------------------------------------------------------------ the paper's rows


PAPER = [
    ("l", 256, 20, 2, 4.8),
    ("xl", 256, 20, 2, 4.9),
    ("xxl", 256, 20, 3, 5.9),
    ("l", 256, 32, 2, 5.4),
    ("xl", 256, 32, 2, 5.0),
    ("l", 512, 48, 4, 7.3),
    ("xl", 512, 48, 4, 6.0),
]


@pytest.mark.parametrize("model, res, steps, tr, cfg", PAPER)
def test_one_config_and_script_per_row_of_the_paper(model, res, steps, tr, cfg):
    name = f"lpd_{model}_{res}_{steps}steps"
    config = os.path.join(ROOT, "configs", f"eval_{name}.yaml")
    args = main_eval.parse_args_with_config(main_eval.build_parser(), ["--config", config])
    assert (args.model, args.img_size, args.generation_steps) == (f"lpd_{model}", res, steps)
    assert (args.repulsion_threshold, args.cfg, args.cfg_schedule, args.order) == (
        tr,
        cfg,
        "linear",
        "lpd",
    )
    assert args.num_images == 50000 and args.seed == 0 and not args.random_init
    assert args.bf16 and args.eval_bsz == (
        256 if res == 256 else 64
    )  # the released scripts' --bf16 and batch
    off = main_eval.parse_args_with_config(
        main_eval.build_parser(), ["--config", config, "--no-bf16"]
    )
    assert not off.bf16
    script = open(os.path.join(ROOT, "scripts", "eval", f"{name}.sh")).read()
    assert 'torchrun --nproc_per_node="${NGPUS:-8}" main_eval.py' in script
    assert f'--config configs/eval_{name}.yaml "$@"' in script


def test_the_released_evaluation_command_line_parses_unchanged():
    # scripts/eval/lpd_l_res256_steps20.sh of the released code, flag for flag
    argv = (
        "--img_size 256 --vqgan_path tokenizers/vq_ds16_c2i.pt --model lpd_l "
        "--pretrained_ckpt path/lpd_l_256.pth --evaluate --eval_bsz 256 --bf16 --generation_steps 20 "
        "--order lpd --lpd_order_file orders/lpd_orders_generated/res256_steps20_repulsion2.json "
        "--cfg 4.8 --cfg_schedule linear --output_dir out --local_rank 0"
    ).split()
    a = main_eval.parse_args_with_config(main_eval.build_parser(), argv)
    assert (a.model, a.img_size, a.eval_bsz, a.bf16, a.generation_steps, a.order, a.cfg) == (
        "lpd_l",
        256,
        256,
        True,
        20,
        "lpd",
        4.8,
    )
    assert a.pretrained_ckpt == "path/lpd_l_256.pth" and a.lpd_order_file.endswith(
        "repulsion2.json"
    )
    main_eval.check_args(a, argv)
    a.vqgan_stride = 8
    with pytest.raises(ValueError, match="only the 16x"):
        main_eval.check_args(a, argv)
    with pytest.raises(SystemExit):  # flags are never abbreviated
        main_eval.parse_args_with_config(main_eval.build_parser(), ["--generation_step", "20"])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top_p", "1.5"], "--top_p"),
        (["--seed", str(2**64)], "--seed"),
        (["--run_name", "../elsewhere"], "--run_name"),
        (["--model", "lpd_huge"], "unknown model 'lpd_huge'"),
        (["--model", "lpd_l"], "not the lpd_l preset"),
        (["--group_sizes", "[1]*99999999999999"], "group sizes"),
        (["--img_size", "0"], "--img_size"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, extra, match):
    assert main_eval.main(TINY + ["--output_dir", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


def test_a_config_value_of_the_wrong_type_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(TINY_CONFIG).read() + "bf16: 'false'\n")
    assert (
        main_eval.main(
            [
                "--config",
                str(bad),
                "--random_init",
                "--no_fid",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "bf16 must be true or false" in capsys.readouterr().err
