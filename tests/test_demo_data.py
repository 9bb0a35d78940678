"""Tests for the demo's data side: the embedded digits (lpd.demo.digits) and the digit classifier
(lpd.demo.classifier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpd.demo.classifier import DigitClassifier, accuracy, train_classifier
from lpd.demo.digits import (
    DigitTokens,
    load_digits_dataset,
    load_digits_images,
    load_raw_digits,
    split_indices,
)
from lpd.demo.palette import PaletteTokenizer, uint8_to_images


def test_raw_data() -> None:
    images, labels = load_raw_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_splits_disjoint_stratified_deterministic() -> None:
    train, test, everything = split_indices("train"), split_indices("test"), split_indices("all")
    assert len(train) == 1442 and len(test) == 355 and len(everything) == 1797
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.union1d(train, test), everything)
    assert np.array_equal(split_indices("test"), test)
    _, labels = load_raw_digits()
    per_class = np.bincount(labels[test], minlength=10)
    assert per_class.min() >= 34 and per_class.max() <= 37  # ~20% of each class
    with pytest.raises(ValueError):
        split_indices("val")


def test_token_dataset() -> None:
    tokens, labels = load_digits_dataset("test")
    assert tokens.shape == (355, 16, 16) and tokens.dtype == torch.long
    assert labels.shape == (355,) and labels.dtype == torch.long
    assert tokens.min() == 0 and tokens.max() == 3 and 0 <= labels.min() and labels.max() == 9
    assert (tokens == 0).float().mean() > 0.4  # mostly background
    again, again_labels = load_digits_dataset("test")
    assert torch.equal(tokens, again) and torch.equal(labels, again_labels)
    binary, _ = load_digits_dataset("test", levels=2)
    assert binary.max() == 1
    small, _ = load_digits_dataset("train", grid_size=8, levels=8)
    assert small.shape == (1442, 8, 8)
    with pytest.raises(ValueError):
        load_digits_dataset("test", grid_size=1)

    ds = DigitTokens("train")
    assert len(ds) == 1442 and ds.seq_len == 256
    seq, label = ds[5]
    assert seq.shape == (256,) and label.shape == () and 0 <= int(label) <= 9


def test_images_match_tokens() -> None:
    tokens, labels = load_digits_dataset("test")
    images, image_labels = load_digits_images("test")
    assert images.shape == (355, 3, 256, 256) and images.dtype == torch.uint8
    assert torch.equal(labels, image_labels)
    tok = PaletteTokenizer()
    assert torch.equal(tok.encode(uint8_to_images(images[:16])), tokens[:16])
    floats, _ = load_digits_images("test", grid_size=4, uint8=False, patch=2)
    assert floats.shape == (355, 3, 8, 8) and floats.dtype == torch.float32


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return train_classifier(seed=0, epochs=6)


def test_classifier_accuracy_and_features(classifier: DigitClassifier) -> None:
    tokens, labels = load_digits_dataset("test")
    acc = accuracy(classifier, tokens, labels)
    assert acc >= 0.9
    images, _ = load_digits_images("test")
    features, logits = classifier.features(images[:32])
    assert features.shape == (32, classifier.feature_dim) and logits.shape == (32, 10)
    assert features.dtype == torch.float32 and (features.std(0) > 0).all()  # no dead units
    # images and token grids reach the network as identical inputs
    assert torch.equal(logits, classifier.predict_tokens(tokens[:32].flatten(1)))
    with pytest.raises(TypeError):
        classifier.features(uint8_to_images(images[:2]))
    with pytest.raises(ValueError):
        classifier.features(images[:2, :, :250, :250])


def test_classifier_deterministic_and_leaves_global_rng() -> None:
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    tokens, labels = load_digits_dataset("train")
    a = train_classifier(seed=3, epochs=1, tokens=tokens[:256], labels=labels[:256])
    b = train_classifier(seed=3, epochs=1, tokens=tokens[:256], labels=labels[:256])
    c = train_classifier(seed=4, epochs=1, tokens=tokens[:256], labels=labels[:256])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    with pytest.raises(ValueError):
        train_classifier(epochs=0)
    with pytest.raises(ValueError):
        train_classifier(tokens=tokens)
    with pytest.raises(ValueError):
        train_classifier(num_threads=0)
