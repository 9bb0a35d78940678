"""The CPU demo: embedded digits, the palette tokenizer, the judge, and a shortened end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from lpd.demo.digits import DigitTokens, load_digits_dataset, load_digits_images, split_indices
from lpd.tokenizer import make_tokenizer
from lpd.demo.palette import PaletteTokenizer


def test_digits_splits_are_disjoint_stratified_and_deterministic():
    train, test = split_indices("train"), split_indices("test")
    assert len(train) == 1442 and len(test) == 355
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(set(train.tolist()) | set(test.tolist())) == list(range(1797))
    tokens, labels = load_digits_dataset("test")
    again, labels2 = load_digits_dataset("test")
    assert torch.equal(tokens, again) and torch.equal(labels, labels2)
    assert tokens.shape == (355, 16, 16) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 4
    assert torch.bincount(labels, minlength=10).min() >= 34  # every digit held out
    ds = DigitTokens("train")
    x, y = ds[0]
    assert x.shape == (256,) and 0 <= int(y) < 10 and len(ds) == 1442


def test_digit_grids_have_ink_and_background():
    tokens, _ = load_digits_dataset("train")
    frac_ink = (tokens > 0).float().mean().item()
    assert 0.2 < frac_ink < 0.7
    assert (tokens[:, :, 0] == 0).float().mean() > 0.9  # the left column is background
    assert (tokens == 3).any(-1).any(-1).float().mean() > 0.9  # nearly every digit has full-ink cells


def test_palette_round_trips_are_exact():
    tok = PaletteTokenizer(levels=4)
    grids = torch.randint(0, 4, (3, 16, 16), generator=torch.Generator().manual_seed(0))
    images = tok.decode(grids)
    assert images.shape == (3, 3, 256, 256) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(tok.encode(images), grids)
    assert torch.equal(tok.decode(tok.encode(images)), images)
    assert torch.equal(tok.decode(grids.flatten(1)), images)  # raster [B, N] works too
    assert tok.codebook_size == 4 and tok.downsample_factor == 16


def test_palette_bad_inputs():
    tok = PaletteTokenizer(levels=4)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        tok.decode(torch.full((1, 4, 4), 4))
    with pytest.raises(ValueError, match="multiples of patch"):
        tok.encode(torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match="levels must be"):
        PaletteTokenizer(levels=1)


def test_make_tokenizer_palette():
    tok = make_tokenizer("palette", vq_config={"levels": 4})
    assert isinstance(tok, PaletteTokenizer) and tok.levels == 4
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("pixels")


def test_images_match_tokens_through_the_classifier_inputs():
    from lpd.demo.classifier import DigitClassifier

    images, labels = load_digits_images("test", uint8=True)
    tokens, labels2 = load_digits_dataset("test")
    assert torch.equal(labels, labels2)
    clf = DigitClassifier()
    assert torch.equal(clf.images_to_input(images[:8]), clf.tokens_to_input(tokens[:8]))
    feats, logits = clf.features(images[:8])
    assert feats.shape == (8, 64) and logits.shape == (8, 10)


def test_classifier_learns_the_digits():
    from lpd.demo.classifier import accuracy, train_classifier

    clf = train_classifier(seed=0, epochs=4)
    tokens, labels = load_digits_dataset("test")
    assert accuracy(clf, tokens, labels) >= 0.9


def test_shortened_demo_run_writes_its_outputs(tmp_path):
    from lpd.demo.run import main

    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--epochs", "1", "--max_train_samples", "32", "--steps", "8,20",
            "--orders", "lpd,raster", "--num_images", "20", "--eval_bsz", "10", "--classifier_epochs", "2",
            "--model_config", json.dumps({"embed_dim": 32, "depth": 1, "num_heads": 2, "vocab_size": 4,
                                          "class_num": 10, "proj_dropout": 0.0})]
    assert main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= record["classifier_accuracy"] <= 1.0
    rows = record["ablation"]
    assert [(r["order"], r["steps"]) for r in rows] == [("lpd", 8), ("lpd", 20), ("raster", 8), ("raster", 20)]
    for r in rows:
        assert set(r) == {"order", "steps", "accuracy", "frechet", "seconds"}
        assert 0.0 <= r["accuracy"] <= 1.0 and r["frechet"] >= 0 and r["seconds"] > 0
    assert (out / "ablation.png").stat().st_size > 0
    for order, steps in [("lpd", 8), ("raster", 20)]:
        assert (out / "samples" / f"{order}_steps{steps}.png").stat().st_size > 0
    assert (out / "train" / "checkpoint-last.pth").exists()
    # A second run reuses the finished training run and gives the same samples.
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert [r["accuracy"] for r in again["ablation"]] == [r["accuracy"] for r in rows]
    assert again["train_seconds"] == 0.0
