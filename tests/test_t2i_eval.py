"""Text-to-image evaluation: prompt files, CLIPScore on a tiny CLIP saved and loaded by path."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lpd.images import write_png
from lpd.text.clipscore import CLIPScorer, clip_score
from lpd.text.prompts import prompt_of, read_prompts

PROMPTS = ["a red 7", "seven", "a bold 3 to the left of a 5", "x", "a small 2 in the top left"]


def save_tiny_clip(folder, seed=0):
    """A CLIP of two 16-wide layers with a byte-level tokenizer (no merges), saved offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(image_size=32, patch_size=8, **layers)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config={**text, **layers}, vision_config=vision, projection_dim=8)
    )
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def _images(n=5, size=48):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_score_equals_an_independent_computation(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    images = _images()
    model, proc = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    inputs = proc(
        text=PROMPTS, images=list(images), padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp at 0 matters here
    expected = (100 * cos.clamp(min=0)).double()

    scorer = CLIPScorer(clip_folder)
    out = clip_score(scorer, images, PROMPTS, batch_size=2)
    assert out["clip_score_w100"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert out["clip_score_w100_std"] == pytest.approx(float(expected.std(False)), abs=1e-4)
    assert out["clip_model"] == clip_folder and len(out["clip_sha256"]) == 64
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        write_png(paths[-1], im)
    by_path = clip_score(scorer, paths, PROMPTS, batch_size=3)
    assert by_path["clip_score_w100"] == pytest.approx(out["clip_score_w100"], abs=1e-5)


def test_clip_score_errors(clip_folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--clip_model .*cannot be loaded"):
        CLIPScorer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        clip_score(CLIPScorer(clip_folder), _images(), PROMPTS[:4])
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip fails
    with pytest.raises(FileNotFoundError, match="pip install open_clip_torch"):
        CLIPScorer("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red 7\n\n  seven  \nx\n", encoding="utf-8")
    prompts, digest = read_prompts(txt)
    assert prompts == ["a red 7", "seven", "x"] and len(digest) == 64
    assert [prompt_of(prompts, i) for i in range(5)] == [
        "a red 7",
        "seven",
        "x",
        "a red 7",
        "seven",
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": p, "id": i}) for i, p in enumerate(PROMPTS)))
    assert read_prompts(jsonl)[0] == PROMPTS
    assert read_prompts(jsonl)[1] != read_prompts(txt)[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"text": "no caption"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: .*\"caption\""):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.txt")
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(tmp_path / "nope.txt")
