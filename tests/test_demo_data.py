"""The demo's data and judge: embedded digits (lpd.demo.digits), the classifier, bootstrap intervals and
the Judge's scores (lpd.demo.classifier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpd.demo.classifier import (
    DigitClassifier,
    Judge,
    accuracy,
    bootstrap_ci,
    frechet_to,
    train_classifier,
)
from lpd.demo.digits import load_digits_dataset, load_raw_digits, split_indices
from lpd.metrics import frechet_distance
from lpd.tokenizer.palette import PaletteTokenizer, images_to_uint8, uint8_to_images


def _images(tokens: torch.Tensor) -> np.ndarray:
    """Token grids -> decoded uint8 images [n, 256, 256, 3], the layout generate_images returns."""
    return images_to_uint8(PaletteTokenizer().decode(tokens)).permute(0, 2, 3, 1).numpy()


def test_raw_data() -> None:
    images, labels = load_raw_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [
        178,
        182,
        177,
        183,
        181,
        182,
        181,
        179,
        174,
        180,
    ]
    assert not images.flags.writeable


def test_splits_disjoint_stratified_deterministic() -> None:
    train, test, everything = split_indices("train"), split_indices("test"), split_indices("all")
    assert len(train) == 1442 and len(test) == 355 and len(everything) == 1797
    assert np.intersect1d(train, test).size == 0 and np.array_equal(
        np.union1d(train, test), everything
    )
    per_class = np.bincount(load_raw_digits()[1][test], minlength=10)
    assert per_class.min() >= 34 and per_class.max() <= 37  # ~20% of each digit
    with pytest.raises(ValueError, match="split must be"):
        split_indices("val")


def test_token_grids() -> None:
    tokens, labels = load_digits_dataset("test")
    assert tokens.shape == (355, 16, 16) and tokens.dtype == labels.dtype == torch.long
    assert tokens.min() == 0 and tokens.max() == 3 and labels.max() == 9
    assert 0.2 < (tokens > 0).float().mean() < 0.7  # ink and background
    assert (tokens[:, :, 0] == 0).float().mean() > 0.9  # the left column is background
    assert (tokens == 3).flatten(1).any(
        1
    ).float().mean() > 0.9  # nearly every digit has full-ink cells
    again, labels2 = load_digits_dataset("test")
    assert torch.equal(tokens, again) and torch.equal(labels, labels2)
    assert load_digits_dataset("test", levels=2)[0].max() == 1
    assert load_digits_dataset("train", grid_size=8, levels=8)[0].shape == (1442, 8, 8)
    images = _images(tokens[:16])  # decoded digits are palette images: exact round trip
    assert torch.equal(
        PaletteTokenizer().encode(uint8_to_images(torch.from_numpy(images).permute(0, 3, 1, 2))),
        tokens[:16],
    )
    with pytest.raises(ValueError, match="grid_size"):
        load_digits_dataset("test", grid_size=1)


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return train_classifier(seed=0, epochs=6)


def test_classifier_accuracy_and_features(classifier: DigitClassifier) -> None:
    tokens, labels = load_digits_dataset("test")
    assert accuracy(classifier, tokens, labels) >= 0.9
    images = torch.from_numpy(_images(tokens[:32])).permute(0, 3, 1, 2)
    features, logits = classifier.features(images)
    assert (
        features.shape == (32, 64) and logits.shape == (32, 10) and (features.std(0) > 0).all()
    )  # no dead units
    # images and their token grids reach the network as identical inputs
    assert torch.equal(classifier.images_to_input(images), classifier.tokens_to_input(tokens[:32]))
    assert torch.equal(logits, classifier.predict_tokens(tokens[:32].flatten(1)))
    with pytest.raises(TypeError):
        classifier.features(uint8_to_images(images[:2]))
    with pytest.raises(ValueError, match="multiples of 16"):
        classifier.features(images[:2, :, :250, :250])


def test_classifier_deterministic_and_leaves_global_state() -> None:
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    tokens, labels = load_digits_dataset("train")
    a, b, c = (
        train_classifier(seed=s, epochs=1, tokens=tokens[:256], labels=labels[:256])
        for s in (3, 3, 4)
    )
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_bootstrap_ci_percentile_and_basic() -> None:
    values = np.random.default_rng(0).normal(size=2000)
    lo, hi = bootstrap_ci(lambda i: values[i].mean(), len(values), resamples=500, seed=1)
    se = values.std() / np.sqrt(len(values))
    assert (
        lo < values.mean() < hi and abs((hi - lo) / (2 * 1.96 * se) - 1) < 0.15
    )  # the normal-theory width
    assert bootstrap_ci(lambda i: values[i].mean(), len(values), resamples=500, seed=1) == [
        lo,
        hi,
    ]  # seeded
    assert bootstrap_ci(lambda i: values[i].mean(), len(values), resamples=500, seed=2) != [lo, hi]
    # basic = 2 * estimate - percentiles of the same resamples
    blo, bhi = bootstrap_ci(
        lambda i: values[i].mean(), len(values), resamples=500, seed=1, basic=True
    )
    assert blo == pytest.approx(2 * values.mean() - hi) and bhi == pytest.approx(
        2 * values.mean() - lo
    )
    # a statistic biased by resampling (the variance of a sample with repeats is smaller):
    # the basic interval moves the other way
    plo, _ = bootstrap_ci(lambda i: len(np.unique(i)), 100, resamples=200)
    _, bhi = bootstrap_ci(lambda i: len(np.unique(i)), 100, resamples=200, basic=True)
    assert plo < 100 and bhi > 100


def test_fast_frechet_equals_the_metrics_code() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for x in (rng.normal(size=(200, 16)), ref[:150] + 0.5):
        assert frechet_to(mu, sigma)(x) == pytest.approx(
            frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma), rel=1e-8
        )


def test_judge_scores_with_intervals(classifier: DigitClassifier) -> None:
    judge = Judge.held_out(classifier, resamples=200, seed=0)
    tokens, labels = load_digits_dataset("train")
    images, labels = _images(tokens[:200]), labels[:200].numpy()
    row = judge.score(images, labels)
    assert set(row) == {
        "num_images",
        "accuracy",
        "accuracy_ci95",
        "frechet",
        "frechet_debiased",
        "frechet_ci95",
    }
    assert row["num_images"] == 200 and row["accuracy"] >= 0.9
    assert row["frechet_ci95"][0] < row["frechet_ci95"][1]
    # the definitions, written out: plug-in Fréchet distance to the held-out features (scipy's
    # sqrtm), 200 resamples of the 200 images (numpy's seeded stream), the debiased 2 f - mean(f*)
    # with the basic interval [2 f - q97.5, 2 f - q2.5] around it (floored at 0), and the
    # percentile interval of the accuracy
    held_out, _ = load_digits_dataset("test")
    with torch.no_grad():
        ref = classifier.embed(classifier.tokens_to_input(held_out))[0].double().numpy()
        feats, logits = classifier.embed(classifier.tokens_to_input(tokens[:200]))
    f, correct = feats.double().numpy(), (logits.argmax(-1).numpy() == labels)
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    fd = lambda x: frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)  # noqa: E731
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 200, 200) for _ in range(200)]
    fstar = np.array([fd(f[i]) for i in draws])
    plug = fd(f)
    assert row["frechet"] == pytest.approx(plug, rel=1e-6) and row["accuracy"] == correct.mean()
    assert row["frechet_debiased"] == pytest.approx(max(0.0, 2 * plug - fstar.mean()), rel=1e-6)
    basic = [max(0.0, 2 * plug - np.percentile(fstar, q)) for q in (97.5, 2.5)]
    assert row["frechet_ci95"] == pytest.approx(basic, rel=1e-6)
    accuracies = [correct[i].mean() for i in draws]
    assert row["accuracy_ci95"] == pytest.approx(np.percentile(accuracies, [2.5, 97.5]).tolist())
    assert judge.score(torch.from_numpy(images), labels) == row  # tensors too; deterministic
    wrong = judge.score(images, (labels + 1) % 10)
    assert wrong["accuracy"] < 0.1 and wrong["frechet"] == row["frechet"]
    # one digit drawn over and over is far from the held-out digits
    ones = judge.score(images[labels == 1][:1].repeat(100, 0), np.ones(100, int))
    assert ones["frechet"] > 5 * row["frechet"]
