"""lpd.pipeline: images from labels in one call, the same images as an evaluation run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from lpd.evaluate import RunSpec, generate_images
from lpd.files import CheckpointError
from lpd.models import LPD, LPDConfig, build_lpd
from lpd.pipeline import PAPER_SETTINGS, LPDPipeline, main, paper_settings
from lpd.sampling import SamplingConfig
from lpd.tokenizer import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))


@pytest.fixture(scope="module")
def pipe():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = LPD(LPDConfig.from_name("lpd_tiny", 64, **TINY["model_config"]))
    model.initialize_weights(torch.Generator().manual_seed(1))
    yield LPDPipeline(model, make_tokenizer("vq", None, TINY["vq_config"], seed=2), name="lpd_tiny")
    torch.set_num_threads(n)


def test_images_are_those_of_an_evaluation_run_with_the_same_seed(pipe):
    sizes = [1, 3, 5, 7]
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    run = generate_images(
        pipe.model,
        pipe.tokenizer,
        RunSpec(8, sizes, labels=labels, seed=5, eval_bsz=3),
        SamplingConfig(repulsion_threshold=2.0, cfg=2.0),
    )
    got = pipe(
        labels[2:6], group_sizes=sizes, cfg=2.0, repulsion_threshold=2.0, seed=5, start_index=2
    )
    assert got.dtype == np.uint8 and got.shape == (4, 64, 64, 3)
    assert np.array_equal(got, run.images[2:6])
    # image k depends only on (seed, start_index + k), not on the rest of the call
    two = pipe(
        labels[3:5], group_sizes=sizes, cfg=2.0, repulsion_threshold=2.0, seed=5, start_index=3
    )
    assert np.array_equal(two, got[1:3])
    one = pipe(
        labels[3:4], group_sizes=sizes, cfg=2.0, repulsion_threshold=2.0, seed=5, start_index=3
    )
    assert np.array_equal(one[0], got[1])
    other = pipe(
        labels[2:6], group_sizes=sizes, cfg=2.0, repulsion_threshold=2.0, seed=6, start_index=2
    )
    assert not np.array_equal(other, got)


def test_explicit_orders_and_other_order_kinds(pipe):
    n = pipe.grid_size**2
    raster = np.tile(np.arange(n), (2, 1))
    a = pipe([0, 7], group_sizes="[4]*4", cfg=1.0, orders=raster)
    b = pipe([0, 7], group_sizes="[4]*4", cfg=1.0, order="raster")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="one row per label"):
        pipe([0, 7, 1], group_sizes="[4]*4", cfg=1.0, orders=raster)
    with pytest.raises(ValueError, match="row 0: position 0 appears twice"):
        pipe([0, 7], group_sizes="[4]*4", cfg=1.0, orders=np.zeros((2, n), dtype=np.int64))


def test_paper_settings_are_the_defaults_and_unknown_settings_need_cfg(pipe):
    assert PAPER_SETTINGS[("lpd_l", 256, 20)] == (2.0, 4.8) and paper_settings(
        "lpd_xxl", 256, 20
    ) == (3.0, 5.9)
    assert (
        paper_settings("lpd_xl", 512, 48) == (4.0, 6.0) and paper_settings("lpd_l", 256, 21) is None
    )
    assert len(PAPER_SETTINGS) == 7
    for (model, res, steps), (
        tr,
        cfg,
    ) in PAPER_SETTINGS.items():  # the same rows as the eval configs
        conf = yaml.safe_load(
            open(os.path.join(ROOT, "configs", f"eval_{model}_{res}_{steps}steps.yaml"))
        )
        assert (conf["repulsion_threshold"], conf["cfg"]) == (tr, cfg)
    with pytest.raises(ValueError, match="pass cfg="):
        pipe([1], group_sizes=[1, 3, 5, 7])
    with pytest.raises(ValueError, match="one or more integer class indices"):
        pipe([], cfg=1.0, group_sizes=[16])
    with pytest.raises(ValueError, match="integer class indices"):
        pipe([1.5], cfg=1.0, group_sizes=[16])
    with pytest.raises(ValueError, match="labels must be in"):
        pipe([10_000], cfg=1.0, group_sizes=[16])


def test_grid_and_pil(pipe, tmp_path):
    images = pipe([1, 2, 3], group_sizes=[16], cfg=1.0)
    pils = pipe.to_pil(images)
    assert (
        len(pils) == 3
        and pils[0].size == (64, 64)
        and np.array_equal(np.asarray(pils[2]), images[2])
    )
    pipe.save_grid(images, tmp_path / "g.png", ncol=2)
    from PIL import Image

    with Image.open(tmp_path / "g.png") as g:
        assert g.size == (130, 130)  # 2 x 2 tiles and a 2-pixel gutter
        grid = np.asarray(g)
    assert (
        np.array_equal(grid[66:, :64], images[2])
        and (grid[64:66] == 255).all()
        and (grid[:, 64:66] == 255).all()
    )


def test_offline_names_every_missing_file_in_python_words_and_in_flags(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        LPDPipeline.from_pretrained("lpd_l", 256, device="cpu")
    msg = str(info.value)
    assert (
        msg.startswith("2 files are missing")
        and "mit-han-lab/lpd_l_256" in msg
        and "FoundationVision/LlamaGen" in msg
    )
    assert (
        'checkpoint="/path/to/lpd_l_256.pth"' in msg
        and 'vqgan_path="/path/to/vq_ds16_c2i.pt"' in msg
    )
    assert (
        "--pretrained_ckpt" not in msg
        and "--vqgan_path" not in msg
        and "python -m lpd.download lpd_l 256" in msg
    )
    assert str(tmp_path / "hf" / "hub") in msg  # paths are not rewritten
    with pytest.raises(ValueError, match="pass cfg= "):
        LPDPipeline(TINY_MODEL(), make_tokenizer("palette"), name=None)([1], steps=8)
    assert (
        main(
            [
                "--model",
                "lpd_xl",
                "--img_size",
                "512",
                "--device",
                "cpu",
                "--output",
                str(tmp_path / "s.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: 2 files are missing")
        and "mit-han-lab/lpd_xl_512" in err
        and not (tmp_path / "s.png").exists()
    )
    assert (
        "--pretrained_ckpt /path/to/lpd_xl_512.pth" in err
        and "--vqgan_path /path/to/vq_ds16_c2i.pt" in err
    )


def test_python_words_rename_the_pipelines_flags_and_nothing_else():
    from lpd.pipeline import python_words

    text = (
        "pass --pretrained_ckpt /p/x.pth, or --random_init for random weights, and --cfg; cache "
        "/h/models--mit-han-lab--lpd_l_256; run `python -m lpd.download lpd_l 256 --list`; --fid_stats"
    )
    assert python_words(text) == (
        'pass checkpoint="/p/x.pth", and cfg=; cache /h/models--mit-han-lab--lpd_l_256; '
        "run `python -m lpd.download lpd_l 256 --list`; --fid_stats"
    )


def TINY_MODEL() -> LPD:  # noqa: N802
    return LPD(
        LPDConfig(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=4, class_num=10)
    )


def _demo_checkpoint(tmp_path) -> str:
    """A checkpoint as ``python -m lpd.demo`` trains it (palette tokenizer, 10 classes), shortened to one epoch."""
    from lpd.config import parse_args_with_config
    from lpd.demo.run import build_parser, train_demo

    small = {
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "vocab_size": 4,
        "class_num": 10,
        "proj_dropout": 0.0,
    }
    args = parse_args_with_config(
        build_parser(),
        [
            "--output_dir",
            str(tmp_path / "demo"),
            "--epochs",
            "1",
            "--max_train_samples",
            "32",
            "--model_config",
            json.dumps(small),
        ],
    )
    train_demo(args, torch.device("cpu"), log=lambda *_: None)
    return str(tmp_path / "demo" / "train" / "checkpoint-last.pth")


def test_the_demo_model_samples_digits_with_its_own_size_classes_and_tokenizer(tmp_path, capsys):
    from PIL import Image

    from lpd.export import export
    from lpd.tokenizer import PaletteTokenizer

    ckpt = _demo_checkpoint(tmp_path)
    out = tmp_path / "digits.png"
    assert (
        main(["--pretrained_ckpt", ckpt, "--steps", "8", "--device", "cpu", "--output", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "256 px, classes [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], cfg 4, τr 2" in printed
    )  # cfg: what training evaluated at
    pipe = LPDPipeline.from_pretrained(ckpt, device="cpu")  # a path as the first argument
    assert isinstance(pipe.tokenizer, PaletteTokenizer) and pipe.tokenizer.levels == 4
    assert (pipe.img_size, pipe.model.config.class_num, pipe.cfg) == (256, 10, 4.0)
    with pytest.raises(CheckpointError, match="use img_size=") as e:  # Python names, not flags
        LPDPipeline.from_pretrained(checkpoint=ckpt, img_size=128, device="cpu")
    assert "--img_size" not in str(e.value)
    images = pipe(list(range(10)), steps=8)
    assert set(np.unique(images)) <= {0, 85, 170, 255}  # the 4 greys of the palette
    by_keyword = LPDPipeline.from_pretrained(checkpoint=ckpt, device="cpu")
    assert np.array_equal(by_keyword(list(range(10)), steps=8), images)
    with Image.open(out) as grid:
        grid = np.asarray(grid)
    assert np.array_equal(grid[:256, :256], images[0]) and np.array_equal(
        grid[:256, -256:], images[9]
    )  # one row
    assert (
        main(
            [
                "--pretrained_ckpt",
                ckpt,
                "--labels",
                "207",
                "--steps",
                "8",
                "--output",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "labels must be in 0..9" in capsys.readouterr().err
    # an export of it: the same model, size, classes and tokenizer, from the folder alone
    export(ckpt, str(tmp_path / "export"))
    card = (tmp_path / "export" / "README.md").read_text()
    assert (
        "pipe([0, 1, 2, 3], steps=20, cfg=4.0)" in card
        and "207" not in card
        and "main_eval.py" not in card
    )
    assert str(tmp_path) not in card and 'from_pretrained("path/to/export")' in card
    again = LPDPipeline.from_pretrained(str(tmp_path / "export"), device="cpu")
    assert isinstance(again.tokenizer, PaletteTokenizer) and again.cfg == 4.0
    assert np.array_equal(again(list(range(10)), steps=8), images)
    assert (
        main(
            [
                "--model",
                str(tmp_path / "export"),
                "--steps",
                "8",
                "--output",
                str(tmp_path / "e.png"),
            ]
        )
        == 0
    )


def test_the_command_line_never_writes_over_a_file_lpd_did_not_write(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr(
        LPDPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded")
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    before = (tmp_path / "photo.png").read_bytes()
    assert main(["--output", str(tmp_path / "photo.png")]) == 2
    assert (
        "--output" in (err := capsys.readouterr().err)
        and "not written by lpd" in err
        and "--overwrite" in err
    )
    assert (
        main(
            [
                "--output",
                str(tmp_path / "photo.png"),
                "--pretrained_ckpt",
                str(tmp_path / "photo.png"),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "is also --pretrained_ckpt" in capsys.readouterr().err
    assert (tmp_path / "photo.png").read_bytes() == before


def test_inpaint_and_outpaint_edit_with_the_pipeline_settings(pipe):
    from lpd.editing import edit_images
    from lpd.sampling import SamplingConfig

    image = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    ours = SamplingConfig(
        cfg=2.0, top_k=1, repulsion_threshold=2.0
    )  # as given; τr 2 on a 4 x 4 grid
    got = pipe.inpaint(image, "bottom", 3, steps=4, num=2, seed=1, cfg=2.0, top_k=1)
    want = edit_images(
        pipe.model, pipe.tokenizer, image, "bottom", 3, steps=4, num=2, seed=1, sampling=ours
    )
    assert all(np.array_equal(got[k], want[k]) for k in ("source", "masked", "edits"))
    plain = edit_images(pipe.model, pipe.tokenizer, image, "bottom", 3, steps=4, num=2, seed=1)
    assert not np.array_equal(got["edits"], plain["edits"])  # the settings matter
    out = pipe.outpaint(
        image, 3, steps=4, seed=1, cfg=2.0, top_k=1
    )  # the default region: a border of a quarter
    want = edit_images(
        pipe.model, pipe.tokenizer, image, "border:16", 3, steps=4, seed=1, sampling=ours
    )
    assert np.array_equal(out["edits"], want["edits"]) and np.array_equal(
        out["masked"], want["masked"]
    )
    with pytest.raises(ValueError, match="pass cfg="):
        pipe.inpaint(image, "center", 3)


def _export(tmp_path, name, **train_args):
    """An lpd export of a 16-token model trained with the tokenizer ``train_args`` describe."""
    from lpd.export import export
    from lpd.files import save_checkpoint
    from lpd.train import TrainConfig

    model = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=64, class_num=10)
    model.initialize_weights(torch.Generator().manual_seed(0))
    args = TrainConfig(
        model=None, img_size=64, model_config=model.config.to_dict(), **train_args
    ).to_dict()
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": model.config.to_dict(),
            "args": args,
            "epoch": 0,
            "step": 0,
            "global_step": 1,
        },
        tmp_path / f"{name}.pth",
    )
    export(str(tmp_path / f"{name}.pth"), str(tmp_path / name))
    return model, str(tmp_path / name)


def test_from_pretrained_builds_the_tokenizer_the_export_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and an empty cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    model, folder = _export(tmp_path, "palette", tokenizer="palette", vq_config={"levels": 64})
    pipe = LPDPipeline.from_pretrained(folder, device="cpu")
    ref = LPDPipeline(model, make_tokenizer("palette", None, {"levels": 64}))
    kw = dict(group_sizes=[1, 3, 5, 7], cfg=2.0, seed=3)
    assert type(pipe.tokenizer) is type(ref.tokenizer) and np.array_equal(
        pipe([1, 2], **kw), ref([1, 2], **kw)
    )
    _, folder = _export(
        tmp_path, "file", vqgan_path=str(tmp_path / "my_vq.pt")
    )  # trained with a tokenizer file
    with pytest.raises(ValueError, match="my_vq.pt; pass its path with vqgan_path="):
        LPDPipeline.from_pretrained(folder, device="cpu")
    _, folder = _export(tmp_path, "released")  # the released VQ: from the Hub
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        LPDPipeline.from_pretrained(folder, device="cpu")


def test_inpaint_of_a_released_model_takes_the_paper_20_step_settings(monkeypatch):
    import lpd.pipeline

    seen = []
    monkeypatch.setattr(lpd.pipeline, "edit_images", lambda *a, **k: seen.append(k["sampling"]))
    pipe = LPDPipeline(
        build_lpd(img_size=256, embed_dim=32, depth=1, num_heads=2), None, name="lpd_l"
    )
    pipe.inpaint(None, "center", 3, steps=4)
    pipe.outpaint(None, 3, top_k=5)
    assert seen == [
        SamplingConfig(cfg=4.8, repulsion_threshold=2.0),
        SamplingConfig(cfg=4.8, repulsion_threshold=2.0, top_k=5),
    ]


def test_the_command_line_writes_the_grid_of_its_labels(pipe, tmp_path, monkeypatch, capsys):
    calls = []

    def from_pretrained(cls, model, img_size, **kw):
        calls.append((model, img_size, kw))
        return pipe

    monkeypatch.setattr(LPDPipeline, "from_pretrained", classmethod(from_pretrained))
    common = ["--group_sizes", "[4]*4", "--cfg", "2.0", "--device", "cpu"]
    assert (
        main(
            [
                "--model",
                "lpd_xl",
                "--img_size",
                "512",
                "--labels",
                "3, 1,4,",
                "--seed",
                "5",
                "--pretrained_ckpt",
                "ck.pth",
                "--vqgan_path",
                "vq.pt",
                "--output",
                str(tmp_path / "a.png"),
                *common,
            ]
        )
        == 0
    )
    assert calls == [("lpd_xl", 512, dict(checkpoint="ck.pth", vqgan_path="vq.pt", device="cpu"))]
    assert "wrote 3 images (lpd_tiny, 64 px, classes [3, 1, 4], cfg 2" in capsys.readouterr().out
    pipe.save_grid(pipe([3, 1, 4], group_sizes="[4]*4", cfg=2.0, seed=5), tmp_path / "want_a.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "want_a.png").read_bytes()
    assert (
        main(["--output", str(tmp_path / "b.png"), *common]) == 0
    )  # the README's eight classes, seed 0
    pipe.save_grid(
        pipe([207, 360, 387, 974, 88, 979, 417, 279], group_sizes="[4]*4", cfg=2.0),
        tmp_path / "want_b.png",
    )
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "want_b.png").read_bytes()
    assert calls[1][:2] == (None, None)  # from_pretrained's defaults: lpd_l at 256 px


def test_python_m_lpd_pipeline_runs_the_command_line(tmp_path):
    import sys

    from conftest import run_process

    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
    }
    proc = run_process(
        [
            sys.executable,
            "-m",
            "lpd.pipeline",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "s.png"),
        ],
        300,
        env=env,
        cwd=str(tmp_path),
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error:")
        and "mit-han-lab/lpd_l_256" in proc.stderr
    )


def test_every_public_name_is_defined():
    """``from lpd.pipeline import *`` imports every name of ``__all__``."""
    import lpd.pipeline

    assert all(hasattr(lpd.pipeline, name) for name in lpd.pipeline.__all__)
