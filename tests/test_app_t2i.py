"""The app with a text-conditional model: prompts in Generate (the streamed decode ends at the
pipeline's image) and Edit (the caption regenerates the painted region), messages for empty and
too long prompts; through the handlers and through ``python -m lpd.app`` with gradio_client."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from lpd.app.__main__ import main as app_main
from lpd.app.embed import main as embed_main
from lpd.app.harness import serve
from lpd.app.load import load_app_model
from lpd.app.ui import Studio
from lpd.files import save_checkpoint
from lpd.models import LPD, LPDConfig
from lpd.pipeline import LPDPipeline
from lpd.text.encoders import WordLlamaEncoder

PROMPT = "a bold seven in the top left corner"
SETTINGS = dict(steps=6, cfg=3.0, repulsion_threshold=1.0, seed=4)
ARGS = (6, 3.0, 1.0, "lpd", 4)  # SETTINGS as the page's steps, cfg, τr, order, seed


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny text model (64 px, 4x4 palette tokens, captions of at most 16 tokens) as a training
    checkpoint."""
    torch.manual_seed(0)
    config = LPDConfig(
        img_size=64, embed_dim=32, depth=2, num_heads=4, vocab_size=4, condition="text",
        text_dim=256, max_text_tokens=16, text_encoder=WordLlamaEncoder().record,
    )  # fmt: skip
    model = LPD(config)
    with torch.no_grad():  # captions and the null caption move the logits
        model.text.pos.normal_(0, 0.5)
        model.text.null.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("t2i") / "checkpoint-last.pth"
    args = {"tokenizer": "palette", "vq_config": {"levels": 4}}
    save_checkpoint(
        {"model": model.state_dict(), "model_config": config.to_dict(), "args": args}, path
    )
    return str(path)


@pytest.fixture(scope="module")
def reference(ckpt):
    """``LPDPipeline``'s image of PROMPT with SETTINGS."""
    pipe = LPDPipeline.from_pretrained(ckpt, device="cpu")
    return pipe(prompts=[PROMPT], **SETTINGS)[0]


def _source() -> tuple[np.ndarray, np.ndarray]:
    """A 64 px image of whole 16 px patches and a layer painting its lower half."""
    source = np.zeros((64, 64, 3), np.uint8)
    source[16:64, 16:48] = 255
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[32:] = (255, 0, 255, 255)
    return source, layer


def test_generate_and_edit_take_a_prompt(ckpt, reference, tmp_path):
    app = load_app_model(pretrained_ckpt=ckpt, device="cpu")
    assert app.condition == "text" and app.text_encoder.record == WordLlamaEncoder().record
    studio = Studio(app, str(tmp_path))
    frames = list(studio.generate(None, PROMPT, *ARGS))
    image, _, files, status, _ = frames[-1]
    assert np.array_equal(image, reference) and "done" in status
    settings = json.loads(open(files[1], encoding="utf-8").read())
    assert settings["prompt"] == PROMPT and "label" not in settings
    other = list(studio.generate(None, "two thin strokes", *ARGS))[-1][0]
    assert not np.array_equal(other, reference)  # the prompt matters
    for prompt, message in [
        ("", "type a prompt"),
        ("   ", "type a prompt"),
        (" ".join(["seven"] * 40), "longer than the 16 text tokens"),
    ]:
        with pytest.raises(gr.Error, match=message):
            next(studio.generate("0", prompt, *ARGS))
        with pytest.raises(gr.Error, match=message):
            studio.edit(
                {"background": _source()[0], "layers": [_source()[1]]}, "0", prompt, 4, 2, 0
            )
    source, layer = _source()
    src, _, edits = studio.edit({"background": source, "layers": [layer]}, None, PROMPT, 4, 2, 0)
    assert np.array_equal(src, source) and len(edits) == 2
    assert all(np.array_equal(e[:32], source[:32]) for e in edits)  # the kept tokens, exactly
    again = studio.edit({"background": source, "layers": [layer]}, None, "x", 4, 2, 0)[2]
    assert not all(np.array_equal(a, b) for a, b in zip(again, edits))  # the caption matters


def test_an_export_takes_prompts_and_another_encoder_is_refused(ckpt, reference, tmp_path, capsys):
    out = tmp_path / "export"
    assert embed_main(["--checkpoint", ckpt, "--output_dir", str(out)]) == 0
    studio = Studio(load_app_model(pretrained_ckpt=str(out), device="cpu"), str(tmp_path))
    assert np.array_equal(list(studio.generate(None, PROMPT, *ARGS))[-1][0], reference)
    state = torch.load(ckpt, weights_only=True)
    state["model_config"]["text_encoder"]["digest"] = "0" * 64
    torch.save(state, tmp_path / "other.pth")
    capsys.readouterr()
    assert app_main(["--pretrained_ckpt", str(tmp_path / "other.pth"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "text encoder" in err[0], err


def _png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_the_served_page_takes_a_prompt(ckpt, reference, tmp_path):
    with serve(["--pretrained_ckpt", ckpt, "--device", "cpu"]) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        image, _, _, status = client.predict(None, PROMPT, *ARGS, api_name="/generate")
        assert np.array_equal(_png(image), reference) and "done" in status
        with pytest.raises(Exception, match="type a prompt"):
            client.predict(None, "", *ARGS, api_name="/generate")
        source, layer = _source()
        Image.fromarray(source).save(tmp_path / "s.png")
        Image.fromarray(layer).save(tmp_path / "l.png")
        editor = {
            "background": handle_file(str(tmp_path / "s.png")),
            "layers": [handle_file(str(tmp_path / "l.png"))],
            "composite": None,
        }
        src, _, edits = client.predict(editor, None, PROMPT, 4, 2, 0, api_name="/edit")
        assert np.array_equal(_png(src), source) and len(edits) == 2
        assert all(np.array_equal(_png(e["image"])[:32], source[:32]) for e in edits)
        with pytest.raises(Exception, match="longer than the 16 text tokens"):
            client.predict(editor, None, " ".join(["seven"] * 40), 4, 2, 0, api_name="/edit")
        image, *_ = client.predict(None, PROMPT, *ARGS, api_name="/generate")  # still serving
        assert np.array_equal(_png(image), reference)
