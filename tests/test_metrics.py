"""lpd.metrics: Fréchet distance, Inception Score, statistics files, image sources, the Inception
weights (offline, weights-only), the real Inception-v3 with random weights and the command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from lpd import hub
from lpd import metrics as M


class TinyExtractor(torch.nn.Module):
    """Stand-in for Inception: 4x4 average-pooled RGB (48 features) and fixed random logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.register_buffer(
            "w", torch.randn(48, num_classes, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        return x, 5.0 * x @ self.w


def _images(n: int = 24, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    noise = rng.integers(-40, 40, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)  # N x H x W x 3 (ADM layout)


def _write_folder(path, images: np.ndarray) -> str:
    os.makedirs(path, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(path, f"{i:05d}.png"))
    return str(path)


def _reference_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = TinyExtractor()(torch.from_numpy(images).permute(0, 3, 1, 2))
    return feats.double().numpy(), logits.double().numpy()


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""

    def forbidden(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(hub, "_download_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)


# ------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, rel=1e-10
    )
    assert M.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_closed_form_rotated():
    # the distance is invariant to a common rotation of both Gaussians
    rng = np.random.default_rng(2)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2.0, size=d), rng.uniform(0.1, 2.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = M.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 24)), rng.normal(size=(200, 24)) * 1.5 + 0.3
    s1 = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    s2 = {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}
    ref = fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    assert M.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(
        ref, rel=1e-8
    )


def test_frechet_distance_singular_covariances():
    # fewer samples than dimensions: rank-deficient covariances, as with a few images and 2048 features
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 40))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    y = rng.normal(size=(6, 40)) + 1.0
    fid = M.frechet_distance(mu, sigma, y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0
    zero = np.zeros((40, 40))
    assert M.frechet_distance(mu, zero, mu + 1.0, zero) == pytest.approx(40.0, abs=1e-3)
    # a product with a zero Jordan block has no square root: the small regularisation gives the
    # closed form |dmu|^2 + tr s1 + tr s2 - 2 sum sqrt(eig(s1 s2)) = 3 + 13 + 9 - 2 * 3
    a, b = np.array([[2.0, -2], [2, 0], [0, -1]]), np.array([[-1.0, -1], [1, 1], [-1, 2]])
    s1, s2 = a @ a.T, b @ b.T
    assert np.sort(np.linalg.eigvals(s1 @ s2).real) == pytest.approx([0, 0, 9], abs=1e-9)
    assert M.frechet_distance(np.zeros(3), s1, np.ones(3), s2) == pytest.approx(19.0, abs=0.02)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------ Inception Score


def test_inception_score_equal_logits_is_one():
    mean, std = M.inception_score(torch.zeros(50, 7), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_is_num_classes():
    k = 10
    logits = (
        60.0 * np.eye(k)[np.tile(np.arange(k), 10)]
    )  # 100 near one-hot rows, every class 10 times
    mean, std = M.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0.0


@pytest.mark.parametrize("n, splits", [(103, 10), (40, 3), (7, 7)])
def test_inception_score_matches_torch_fidelity(n, splits):
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(5).normal(size=(n, 17)) * 3).float()
    ref = isc_features_to_metric(logits, splits=splits)
    mean, std = M.inception_score(logits.numpy(), splits=splits)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9, abs=1e-12)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        M.inception_score(np.zeros(5), splits=1)


# ------------------------------------------------------------------------------ statistics files


def test_save_load_statistics_roundtrip_atomic(tmp_path):
    rng = np.random.default_rng(6)
    mu, x = rng.normal(size=8), rng.normal(size=(20, 8))
    sigma = np.cov(x, rowvar=False)
    path = tmp_path / "sub" / "stats.npz"
    M.save_statistics(path, mu, sigma)
    M.save_statistics(path, mu + 1, sigma)  # overwrite in place
    mu2, sigma2 = M.load_statistics(path)
    np.testing.assert_array_equal(mu2, mu + 1)
    np.testing.assert_array_equal(sigma2, sigma)
    assert sorted(os.listdir(path.parent)) == ["stats.npz"]  # no temporary file left behind
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]


def test_save_statistics_rejects_bad_shapes(tmp_path):
    with pytest.raises(M.MetricsError):
        M.save_statistics(tmp_path / "s.npz", np.zeros(3), np.zeros((3, 4)))
    assert not os.listdir(tmp_path)


def test_load_statistics_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        M.load_statistics(tmp_path / "adm_in256_stats.npz")
    msg = str(ei.value)
    assert "adm_in256_stats.npz" in msg and "--fid_stats" in msg and "lpd.metrics stats" in msg


def test_load_statistics_wrong_content_is_clear(tmp_path):
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(M.MetricsError, match=r"'mu' and 'sigma'.*arr_0"):
        M.load_statistics(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(M.MetricsError, match="cannot read"):
        M.load_statistics(tmp_path / "junk.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(M.MetricsError, match="not an .npz"):
        M.load_statistics(tmp_path / "array.npy")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(M.MetricsError, match="mu"):
        M.load_statistics(tmp_path / "shape.npz")


def test_load_statistics_accepts_adm_reference_batch_layout(tmp_path):
    # ADM's reference batches hold mu/sigma next to other entries
    np.savez(
        tmp_path / "ref.npz",
        arr_0=np.zeros((1, 2, 2, 3), np.uint8),
        mu=np.ones(4),
        sigma=np.eye(4),
        mu_s=np.zeros(2),
        sigma_s=np.eye(2),
    )
    mu, sigma = M.load_statistics(tmp_path / "ref.npz")
    assert mu.shape == (4,) and sigma.shape == (4, 4) and mu.dtype == np.float64


# ------------------------------------------------------------------------------ image sources and statistics


def test_compute_statistics_matches_numpy():
    images = _images(30)
    feats, logits = _reference_features(images)
    stats = M.compute_statistics(images, TinyExtractor(), batch_size=7, progress=False)
    assert stats.num_images == 30
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.logits, logits, rtol=1e-5, atol=1e-5)


def test_sources_folder_npz_npy_and_arrays_agree(tmp_path):
    images = _images(24)
    folder = _write_folder(tmp_path / "png", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.save(tmp_path / "samples.npy", images)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    sources = [
        folder,
        str(tmp_path / "samples.npz"),
        tmp_path / "compressed.npz",
        str(tmp_path / "samples.npy"),
        images,
        nchw,
    ]
    ref = M.compute_statistics(images, TinyExtractor(), batch_size=5, progress=False)
    for src in sources:
        stats = M.compute_statistics(src, TinyExtractor(), batch_size=5, progress=False)
        assert stats.num_images == 24
        np.testing.assert_allclose(stats.mu, ref.mu, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, ref.sigma, atol=1e-12)
        # float32 GEMMs of other batch shapes round differently on some CPUs (8e-6 seen on AMD EPYC)
        np.testing.assert_allclose(stats.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for src in (folder, str(tmp_path / "samples.npz"), str(tmp_path / "compressed.npz")):
        count, batches = M.image_batches(src, batch_size=10)
        batches = list(batches)
        assert count == 24 and [b.shape[0] for b in batches] == [10, 10, 4]
        assert torch.equal(torch.cat(batches), nchw)


def test_bad_image_sources_are_clear(tmp_path):
    ex = TinyExtractor()
    with pytest.raises(M.MetricsError, match="uint8"):
        M.compute_statistics(np.zeros((4, 8, 8, 3), np.float32), ex, progress=False)
    with pytest.raises(M.MetricsError, match="RGB"):
        M.compute_statistics(np.zeros((4, 8, 8, 1), np.uint8), ex, progress=False)
    with pytest.raises(M.MetricsError, match="N x 3 x H x W"):
        M.compute_statistics(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), ex, progress=False)
    np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(M.MetricsError, match="arr_0"):
        M.compute_statistics(str(tmp_path / "noarr.npz"), ex, progress=False)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(M.MetricsError, match="float32"):
        M.compute_statistics(str(tmp_path / "float.npz"), ex, progress=False)
    with pytest.raises(M.MetricsError, match="does not exist"):
        M.compute_statistics(str(tmp_path / "missing.npz"), ex, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MetricsError, match="no images"):
        M.compute_statistics(str(tmp_path / "empty"), ex, progress=False)
    mixed = tmp_path / "mixed"
    _write_folder(mixed, _images(2, size=8))
    Image.fromarray(_images(1, size=12)[0]).save(mixed / "00009.png")
    with pytest.raises(M.MetricsError, match="different sizes"):
        M.compute_statistics(str(mixed), ex, batch_size=8, progress=False)
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.compute_statistics(_images(1), ex, progress=False)


def test_16_bit_pngs_read_as_their_grey_values(tmp_path):
    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    (tmp_path / "g").mkdir()
    for i in range(2):
        Image.fromarray((grey + i) * 257).save(
            tmp_path / "g" / f"{i}.png"
        )  # I;16: PIL's convert makes it white
    num, batches = M.image_batches(str(tmp_path / "g"), 2)
    got = next(batches)
    assert num == 2 and got.shape == (2, 3, 8, 8)
    assert all(
        torch.equal(got[i, c], torch.from_numpy((grey + i).astype(np.uint8)))
        for i in range(2)
        for c in range(3)
    )


def test_corrupt_files_are_named(tmp_path):
    ex = TinyExtractor()
    folder = _write_folder(tmp_path / "png", _images(4))
    (tmp_path / "png" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(M.MetricsError, match="00002.png is not a readable image"):
        M.compute_statistics(folder, ex, batch_size=2, progress=False)
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(M.MetricsError, match="junk.npz"):
        M.compute_statistics(str(tmp_path / "junk.npz"), ex, progress=False)
    np.savez(tmp_path / "whole.npz", arr_0=_images(6))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # no zip directory at the end
    with pytest.raises(M.MetricsError, match="cut.npz"):
        M.compute_statistics(str(tmp_path / "cut.npz"), ex, progress=False)


# ------------------------------------------------------------------------------ metrics


def test_end_to_end_folder_and_npz_against_own_statistics(tmp_path):
    images = _images(40)
    folder = _write_folder(tmp_path / "samples", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    stats = M.compute_statistics(folder, TinyExtractor(), batch_size=8, progress=False)
    M.save_statistics(tmp_path / "ref.npz", stats.mu, stats.sigma)
    ref = M.load_statistics(tmp_path / "ref.npz")
    is_mean, is_std = M.inception_score(_reference_features(images)[1], splits=10)
    for src in (folder, str(tmp_path / "samples.npz")):
        out = M.compute_metrics(src, ref, TinyExtractor(), batch_size=16, progress=False)
        assert out["num_images"] == 40
        assert abs(out["fid"]) < 1e-6
        assert out["inception_score"] == pytest.approx(is_mean, rel=1e-5)
        assert out["inception_score_std"] == pytest.approx(is_std, rel=1e-4, abs=1e-6)
    other = M.compute_metrics(
        _images(40, seed=9), (stats.mu, stats.sigma), TinyExtractor(), progress=False
    )
    assert other["fid"] > 1e-3


def test_compute_metrics_without_reference_or_logits_and_with_few_images():
    out = M.compute_metrics(_images(12), None, TinyExtractor(), progress=False)
    assert out["fid"] is None and out["inception_score"] > 1.0 and out["num_images"] == 12
    features_only = lambda x: (TinyExtractor()(x)[0], None)  # noqa: E731
    stats = M.compute_statistics(_images(12), features_only, progress=False)
    assert stats.logits is None
    out = M.compute_metrics(_images(12), (stats.mu, stats.sigma), features_only, progress=False)
    assert (
        abs(out["fid"]) < 1e-6
        and out["inception_score"] is None
        and out["inception_score_std"] is None
    )
    with pytest.warns(UserWarning, match="splits"):
        M.compute_metrics(_images(4), None, TinyExtractor(), progress=False)


def test_reference_of_another_extractor_is_refused():
    with pytest.raises(M.MetricsError, match="2048-d"):
        M.compute_metrics(
            _images(8), (np.zeros(2048), np.eye(2048)), TinyExtractor(), progress=False
        )


# ------------------------------------------------------------------------------ Inception weights


def test_inception_url_matches_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert M.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3


def test_missing_inception_weights_path_never_downloads(tmp_path, no_download):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError) as ei:
        M.inception_extractor(missing)
    msg = str(ei.value)
    assert str(missing) in msg and "--inception_weights" in msg and M.INCEPTION_WEIGHTS_URL in msg


def test_inception_weights_offline_and_not_cached(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as ei:
        M.resolve_inception_weights()
    msg = str(ei.value)
    assert "offline" in msg and M.INCEPTION_WEIGHTS_URL in msg and "--inception_weights" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    # found in torch's hub cache: no download either
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(M.INCEPTION_WEIGHTS_URL)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert M.resolve_inception_weights() == str(cached)


def test_inception_weights_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def no_network(url, dst):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_download_url", no_network)
    with pytest.raises(FileNotFoundError) as ei:
        M.resolve_inception_weights()
    msg = str(ei.value)
    assert "download failed" in msg and "Name or service not known" in msg
    assert M.INCEPTION_WEIGHTS_URL in msg and "--inception_weights" in msg


def _random_inception_weights(path, monkeypatch) -> None:
    """A random state dict with Inception's exact keys and shapes, saved like the released file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    monkeypatch.setattr(
        fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None
    )
    monkeypatch.setattr(fi, "load_state_dict_from_url", lambda *a, **k: {})
    model = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)


def test_inception_weights_are_loaded_weights_only(tmp_path, monkeypatch, no_download):
    evil = tmp_path / "evil.pth"
    torch.save(
        {"w": torch.zeros(2), "args": argparse.Namespace(a=1)}, evil
    )  # an arbitrary pickled object
    before = dict(os.environ)
    with pytest.raises(M.MetricsError, match="weights_only=True"):
        M.inception_extractor(evil)
    assert dict(os.environ) == before  # the forcing switch is restored


def test_real_inception_with_random_weights(tmp_path, monkeypatch, no_download):
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights, monkeypatch)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_isc import isc_features_to_metric

    images = _images(4, size=32)
    ex = M.inception_extractor(weights)  # the CPU by default
    stats = M.compute_statistics(images, ex, batch_size=2, progress=False)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    assert stats.logits.shape == (4, 1008)
    # torch-fidelity's own extractor on the same weights: pool features, IS from the unbiased logits
    ref = FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased", "logits"],
        feature_extractor_weights_path=str(weights),
    ).eval()
    with torch.no_grad():
        pool, unbiased, biased = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(stats.mu, pool.double().mean(0).numpy(), rtol=1e-4, atol=1e-5)
    sigma = np.cov(pool.double().numpy(), rowvar=False)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(stats.logits, unbiased.numpy(), rtol=1e-4, atol=1e-4)
    assert (biased - unbiased).abs().max() > 1e-2  # the fc bias matters: biased logits would differ
    want = isc_features_to_metric(unbiased, splits=2)["inception_score_mean"]
    assert M.inception_score(stats.logits, splits=2)[0] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------ command line


@pytest.fixture
def tiny_inception(monkeypatch):
    """The CLI's Inception replaced by TinyExtractor (48 features)."""
    monkeypatch.setattr(
        M, "inception_extractor", lambda weights=None, device="cpu", **k: TinyExtractor()
    )
    monkeypatch.setattr(M, "INCEPTION_FEATURES", 48)


@pytest.fixture
def no_inception(monkeypatch):
    """Fail the test if the CLI gets as far as building the feature extractor."""

    def never(*a, **k):
        raise AssertionError("the extractor was built before the arguments were checked")

    monkeypatch.setattr(M, "inception_extractor", never)


def _refused(capsys, argv: list[str], *names: str) -> str:
    assert M.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert (
        err.startswith("error: ") and "Traceback" not in err and "img/s" not in err
    )  # no progress bar
    assert captured.out == ""
    for name in names:
        assert name in err, err
    return err


def _stats_file(tmp_path, dim: int = 48) -> str:
    path = tmp_path / "ref.npz"
    M.save_statistics(path, np.zeros(dim), np.eye(dim))
    return str(path)


def test_cli_stats_and_fid(tmp_path, capsys, tiny_inception):
    images = _images(20)
    folder = _write_folder(tmp_path / "ref", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    out = tmp_path / "new" / "folder" / "ref.npz"  # missing folders are created
    assert (
        M.main(
            ["stats", "--input", folder, "--output", str(out), "--device", "cpu", "--no_progress"]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert (
        M.main(
            ["stats", "--input", folder, "--output", str(out), "--no_progress", "--batch_size", "7"]
        )
        == 0
    )
    capsys.readouterr()  # a statistics file is ours to overwrite
    assert (
        M.main(
            [
                "fid",
                "--input",
                str(tmp_path / "samples.npz"),
                "--stats",
                str(out),
                "--device",
                "cpu",
                "--no_progress",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert (
        text.startswith("FID ")
        and abs(float(text.split()[1])) < 1e-4
        and "IS" in text
        and "20 images" in text
    )
    record = json.loads((tmp_path / "m.json").read_text())
    assert abs(record["fid"]) < 1e-6 and record["num_images"] == 20
    # the JSON file is ours to overwrite
    assert (
        M.main(
            [
                "fid",
                "--input",
                folder,
                "--stats",
                str(out),
                "--no_progress",
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )


def test_cli_stats_of_an_image_folder_as_main_cache_reads_it(tmp_path, capsys, tiny_inception):
    from lpd.images import center_crop_arr

    rng = np.random.default_rng(1)
    sizes = {
        "cat": [(40, 30), (33, 33)],
        "dog": [(20, 50), (64, 48), (17, 17)],
    }  # (H, W): any size, cropped to 16
    crops = []
    for cls, shapes in sizes.items():  # ImageFolder order: classes, then files, sorted
        os.makedirs(tmp_path / "data" / "train" / cls)
        for i, shape in enumerate(shapes):
            im = Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
            im.save(tmp_path / "data" / "train" / cls / f"{i}.png")
            crops.append(center_crop_arr(im, 16))
    out = tmp_path / "ref.npz"
    argv = [
        "stats",
        "--input",
        str(tmp_path / "data"),
        "--img_size",
        "16",
        "--output",
        str(out),
        "--no_progress",
    ]
    assert M.main(argv + ["--batch_size", "2"]) == 0 and "from 5 images" in capsys.readouterr().out
    want = M.compute_statistics(np.stack(crops), TinyExtractor(), batch_size=5, progress=False)
    mu, sigma = M.load_statistics(out)
    np.testing.assert_allclose(mu, want.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, want.sigma, rtol=1e-6, atol=1e-9)
    ref, kw = (mu, sigma), dict(batch_size=2, progress=False)  # the fid path crops the same way
    got = M.compute_metrics(str(tmp_path / "data"), ref, TinyExtractor(), img_size=16, **kw)
    assert got == pytest.approx(M.compute_metrics(np.stack(crops), ref, TinyExtractor(), **kw))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    _refused(
        capsys,
        ["stats", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o.npz")],
        "--input",
        "holds no images",
        "ImageFolder",
    )
    (tmp_path / "data" / "train" / "dog" / "9.png").write_bytes(b"\x89PNG broken")
    _refused(capsys, argv, "9.png", "not a readable image")


def test_cli_refuses_output_folders_before_reading_images(tmp_path, capsys, no_inception):
    folder = _write_folder(tmp_path / "ref", _images(3))
    _refused(capsys, ["stats", "--input", folder, "--output", folder], "--output", folder, "folder")
    _refused(
        capsys,
        ["fid", "--input", folder, "--stats", _stats_file(tmp_path), "--json", str(tmp_path)],
        "--json",
        "folder",
    )
    (tmp_path / "plain.txt").write_text("x")
    _refused(
        capsys,
        ["stats", "--input", folder, "--output", str(tmp_path / "plain.txt" / "s.npz")],
        "--output",
        "plain.txt",
        "not a folder",
    )
    _refused(
        capsys,
        [
            "fid",
            "--input",
            folder,
            "--stats",
            _stats_file(tmp_path),
            "--json",
            str(tmp_path / "plain.txt" / "sub" / "m.json"),
        ],
        "--json",
        "not a folder",
    )
    assert sorted(os.listdir(tmp_path)) == ["plain.txt", "ref", "ref.npz"]
    assert len(os.listdir(folder)) == 3


def test_cli_refuses_unwritable_output_folder(tmp_path, capsys, no_inception, monkeypatch):
    # os.access rather than chmod: a test running as root may write anywhere
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if os.fspath(p) == str(locked) else real(p, mode)
    )
    folder = _write_folder(tmp_path / "ref", _images(3))
    _refused(
        capsys,
        ["stats", "--input", folder, "--output", str(locked / "s.npz")],
        "--output",
        "not writable",
    )
    _refused(
        capsys,
        [
            "fid",
            "--input",
            folder,
            "--stats",
            _stats_file(tmp_path),
            "--json",
            str(locked / "new" / "m.json"),
        ],
        "--json",
        str(locked),
        "not writable",
    )
    assert os.listdir(locked) == []


def test_cli_refuses_to_replace_other_files(tmp_path, capsys, no_inception):
    images = _images(3)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    samples = str(tmp_path / "samples.npz")
    before = (tmp_path / "samples.npz").read_bytes()
    _refused(
        capsys,
        ["stats", "--input", samples, "--output", samples],
        "--output",
        "is also --input",
        "an output is never an input",
    )
    np.savez(tmp_path / "other.npz", arr_0=images)
    _refused(
        capsys,
        ["stats", "--input", samples, "--output", str(tmp_path / "other.npz")],
        "--output",
        "not a statistics file",
    )
    stats = _stats_file(tmp_path)
    _refused(
        capsys,
        ["fid", "--input", samples, "--stats", stats, "--json", stats],
        "--json",
        "is also --stats",
    )
    (tmp_path / "config.json").write_text('{"model": "lpd_l"}')  # JSON, but not a record of ours
    _refused(
        capsys,
        ["fid", "--input", samples, "--stats", stats, "--json", str(tmp_path / "config.json")],
        "--json",
        "not a metrics file of lpd.metrics fid",
        "--overwrite",
    )
    assert (tmp_path / "samples.npz").read_bytes() == before and "lpd_l" in (
        tmp_path / "config.json"
    ).read_text()
    assert M.load_statistics(stats)[0].shape == (48,)


def test_cli_refuses_bad_inputs_before_building_inception(tmp_path, capsys, no_inception):
    stats = _stats_file(tmp_path, dim=2048)
    _refused(
        capsys,
        ["fid", "--input", str(tmp_path / "missing"), "--stats", stats],
        "--input",
        "missing",
        "exist",
    )
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _refused(
        capsys,
        ["fid", "--input", str(tmp_path / "junk.npz"), "--stats", stats],
        "--input",
        "junk.npz",
    )
    np.savez(tmp_path / "noarr.npz", images=_images(2))
    _refused(
        capsys,
        ["stats", "--input", str(tmp_path / "noarr.npz"), "--output", str(tmp_path / "o.npz")],
        "noarr.npz",
        "arr_0",
    )
    np.savez(tmp_path / "samples.npz", arr_0=_images(3))
    samples = str(tmp_path / "samples.npz")
    _refused(
        capsys,
        ["fid", "--input", samples, "--stats", str(tmp_path / "nope.npz")],
        "--stats",
        "nope.npz",
    )
    _refused(capsys, ["fid", "--input", samples, "--stats", samples], "--stats", "'mu' and 'sigma'")
    _refused(
        capsys,
        ["fid", "--input", samples, "--stats", _stats_file(tmp_path, dim=12)],
        "--stats",
        "12-d",
        "2048",
    )
    _refused(
        capsys,
        ["stats", "--input", samples, "--output", str(tmp_path / "o.npz"), "--batch_size", "0"],
        "--batch_size",
    )
    _refused(
        capsys,
        ["stats", "--input", samples, "--output", str(tmp_path / "o.npz"), "--device", "nodevice"],
        "--device",
    )
    assert not (tmp_path / "o.npz").exists()


def test_cli_errors_of_weights_and_images_are_one_message(
    tmp_path, capsys, no_download, monkeypatch
):
    folder = _write_folder(tmp_path / "ref", _images(3))
    _refused(
        capsys,
        [
            "stats",
            "--input",
            folder,
            "--output",
            str(tmp_path / "o.npz"),
            "--device",
            "cpu",
            "--inception_weights",
            str(tmp_path / "nope.pth"),
        ],
        "--inception_weights",
        "nope.pth",
    )
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    _refused(
        capsys,
        [
            "stats",
            "--input",
            folder,
            "--output",
            str(tmp_path / "o.npz"),
            "--inception_weights",
            str(tmp_path / "evil.pth"),
        ],
        "evil.pth",
        "weights_only=True",
    )
    monkeypatch.setattr(M, "inception_extractor", lambda *a, **k: TinyExtractor())
    (tmp_path / "ref" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert (
        M.main(["stats", "--input", folder, "--output", str(tmp_path / "o.npz"), "--no_progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "00001.png" in err and "Traceback" not in err
    assert not (tmp_path / "o.npz").exists()


def test_cli_write_failure_is_exit_1(tmp_path, capsys, tiny_inception, monkeypatch):
    def disk_full(path, write_fn, fsync=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(M, "atomic_write_bytes", disk_full)
    folder = _write_folder(tmp_path / "ref", _images(3))
    assert (
        M.main(["stats", "--input", folder, "--output", str(tmp_path / "o.npz"), "--no_progress"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and "o.npz" in err and "No space left" in err


def test_cli_as_a_process_exits_2_without_traceback(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lpd.metrics",
            "stats",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --output") and "Traceback" not in proc.stderr
