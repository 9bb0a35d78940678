"""The app without a server: the embedded model and its digest, the step-by-step decode, the
handlers' checks, the command line and ``python -m lpd.app.embed``."""

from __future__ import annotations

import json
import os
import shutil

import gradio as gr
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lpd.app.__main__ import main as app_main
from lpd.app.embed import main as embed_main
from lpd.app.load import EMBEDDED_DIR, load_app_model
from lpd.app.model import class_names, decode_steps, render_partial
from lpd.app.ui import Studio
from lpd.evaluate import image_seed
from lpd.files import CheckpointError, save_checkpoint
from lpd.models import LPD, LPDConfig
from lpd.orders import lpd_orders
from lpd.sampling import sample_tokens
from lpd.schedules import group_sizes


@pytest.fixture(scope="module")
def app():
    return load_app_model(device="cpu")


@pytest.fixture
def studio(app, tmp_path):
    return Studio(app, str(tmp_path))


def test_the_embedded_model_ships_with_its_digest(app):
    config = json.load(open(os.path.join(EMBEDDED_DIR, "config.json"), encoding="utf-8"))
    assert config["tokenizer"]["kind"] == "palette" and config["parameters"] < 300_000
    assert app.class_names == [str(d) for d in range(10)] and app.condition == "class"
    assert (app.cfg, app.repulsion_threshold, app.model.img_size, app.patch) == (5.0, 2.0, 256, 16)


def test_class_names():
    assert class_names(10)[7] == "7" and class_names(3) == ["class 0", "class 1", "class 2"]
    assert class_names(1000)[207] == "207: golden retriever"  # torchvision's list, no download


def test_weights_that_do_not_match_their_digest_are_refused(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(EMBEDDED_DIR, folder)
    weights = load_file(folder / "model.safetensors")
    weights["pos_embed"] = weights["pos_embed"] + 1e-3
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_app_model(pretrained_ckpt=str(folder), device="cpu")


def test_decode_steps_streams_what_sample_tokens_draws(app):
    sizes = group_sizes(256, 12)
    order = lpd_orders(1, sizes, 16, 1.0, 2.0, seed=5)[0]
    steps = list(decode_steps(app, 4, order, sizes, app.sampling(), seed=5))
    assert [k for k, _ in steps] == list(range(12))
    assert [int((t >= 0).sum()) for _, t in steps] == np.cumsum(sizes).tolist()
    for (_, before), (_, after) in zip(steps, steps[1:]):
        assert torch.equal(after[before >= 0], before[before >= 0])  # decoded tokens stay
    ref = sample_tokens(
        app.model,
        [4],
        order[None],
        sizes,
        app.sampling(),
        generator=[torch.Generator().manual_seed(image_seed(5, 0))],
    )
    assert torch.equal(steps[-1][1], ref)
    frame = render_partial(app, steps[0][1])
    assert (
        frame.shape == (256, 256, 3) and (frame == 128).all(-1).sum() == (256 - sizes[0]) * 16 * 16
    )


def test_generate_streams_frames_then_the_image_and_its_files(studio):
    frames = list(studio.generate("2", "", 20, 5.0, 2.0, "lpd", 1))
    assert len(frames) == 20 and all(f[2] is None for f in frames[:-1])
    image, heat, files, status, last = frames[-1]
    assert image.shape == (256, 256, 3) and last is image and "done" in status
    assert [os.path.basename(f) for f in files] == ["lpd_2_seed1.png", "settings.json"]
    assert all(f.startswith(studio.workdir) for f in files)
    grey = [int((f[0] == 128).all(-1).sum()) for f in frames[:-1]]
    assert grey == sorted(grey, reverse=True) and grey[0] > grey[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (("2", "", 0, 5.0, 2.0, "lpd", 0), "steps must be a whole number from 1 to 256"),
        (("2", "", 8.5, 5.0, 2.0, "lpd", 0), "steps must be a whole number"),
        (("2", "", 8, float("nan"), 2.0, "lpd", 0), "cfg must be a number"),
        (("2", "", 8, 5.0, 2.0, "lpd", -1), "seed must be a whole number"),
        (("2", "", 8, 5.0, 2.0, "zigzag", 0), "order must be one of"),
        (("twelve", "", 8, 5.0, 2.0, "lpd", 0), "pick a class"),
    ],
)
def test_generate_refuses_bad_settings_with_a_message(studio, args, message):
    with pytest.raises(gr.Error, match=message):
        next(studio.generate(*args))


def test_edit_checks_the_image_the_region_and_the_steps(studio):
    source = np.zeros((256, 256, 3), np.uint8)
    source[32:224, 96:160] = 255
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:, 192:, 3] = 255  # the right quarter: 64 tokens
    with pytest.raises(gr.Error, match="upload an image"):
        studio.edit(None, "3", "", 8, 2, 0)
    with pytest.raises(gr.Error, match="paint the region"):
        studio.edit({"background": source, "layers": [np.zeros_like(layer)]}, "3", "", 8, 2, 0)
    with pytest.raises(gr.Error, match="at most the 64 tokens"):
        studio.edit({"background": source, "layers": [layer]}, "3", "", 65, 2, 0)
    src, masked, edits = studio.edit({"background": source, "layers": [layer]}, "3", "", 8, 2, 0)
    assert np.array_equal(src, source) and len(edits) == 2
    assert all(
        np.array_equal(e[:, :192], source[:, :192]) for e in edits
    )  # the unpainted tokens come back
    assert (masked[:, 192:] != source[:, 192:]).any()


def test_orders_draws_any_resolution_and_refuses_others(studio):
    picture, text = studio.orders(1024, 64, 2.0, 0)
    assert picture.ndim == 3 and "64x64 tokens in 64 steps" in text and "context support" in text
    with pytest.raises(gr.Error, match="resolution"):
        studio.orders(300, 20, 2.0, 0)


def test_digits_samples_are_written_for_the_editor(studio):
    assert [os.path.basename(p) for p in studio.samples] == [f"digit_{d}.png" for d in range(10)]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--port", "70000"], "--port"),
        (["--model", "lpd_huge"], "--model"),
        (["--pretrained_ckpt", "/no/such/model"], "--pretrained_ckpt"),
        (["--max_upload_mb", "0"], "--max_upload_mb"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_the_command_line_refuses_bad_flags(argv, flag, capsys):
    assert app_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}")


def test_embed_exports_a_demo_checkpoint_and_never_overwrites(tmp_path, capsys):
    cfg = LPDConfig(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=4, class_num=10)
    ckpt = tmp_path / "checkpoint-last.pth"
    save_checkpoint(
        {
            "model": LPD(cfg).state_dict(),
            "model_config": cfg.to_dict(),
            "args": {"tokenizer": "palette", "vq_config": {"levels": 4}, "cfg": 3.0},
        },
        ckpt,
    )
    out = tmp_path / "embedded"
    assert embed_main(["--checkpoint", str(ckpt), "--output_dir", str(out)]) == 0
    app = load_app_model(pretrained_ckpt=str(out), device="cpu")
    assert (
        json.loads((out / "config.json").read_text())["sampling"]["cfg"] == 5.0
    )  # the demo's settings
    trained = load_app_model(pretrained_ckpt=str(ckpt), device="cpu")  # the checkpoint itself
    assert trained.tokenizer.levels == 4 and trained.cfg == 4.0 and trained.name == ckpt.name
    assert app.cfg == 5.0 and app.model.grid_size == 4
    before = (out / "model.safetensors").read_bytes()
    assert embed_main(["--checkpoint", str(ckpt), "--output_dir", str(out)]) == 2
    assert (
        "exists" in capsys.readouterr().err and (out / "model.safetensors").read_bytes() == before
    )
