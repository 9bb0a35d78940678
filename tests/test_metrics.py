"""Tests of lpd.metrics: Fréchet distance, Inception Score, statistics files, image sources, the
extractor plumbing (a tiny stand-in for Inception, also through torch-fidelity's registry) and
the offline behaviour of the Inception weights.  CPU only, no network.

The one test that runs the real Inception-v3 (random weights) is slow on a CPU and runs only
with LPD_SLOW_TESTS=1.
"""

from __future__ import annotations

import argparse
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from lpd import hub
from lpd import metrics as M

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class TinyExtractor(torch.nn.Module):
    """Stand-in for Inception: 4x4 average-pooled RGB (48 features) and fixed random logits."""

    def __init__(self, num_classes: int = 10, with_logits: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(48, num_classes, generator=g))
        self.with_logits = with_logits

    def forward(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        if not self.with_logits:
            return x
        return {"features": x, "logits": 5.0 * x @ self.w}


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
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = TinyExtractor()(t)
    return out["features"].double().numpy(), out["logits"].double().numpy()


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""

    def forbidden(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(hub, "_download_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    for method in ("sqrtm", "eigh"):
        got = M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
        assert got == pytest.approx(expected, rel=1e-10)
    assert M.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_closed_form_rotated():
    # the distance is invariant to a common rotation of both Gaussians
    rng = np.random.default_rng(2)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2.0, size=d), rng.uniform(0.1, 2.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    for method in ("sqrtm", "eigh"):
        got = M.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T, method=method)
        assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 24)), rng.normal(size=(200, 24)) * 1.5 + 0.3
    s1 = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    s2 = {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}
    ref = fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]
    assert M.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"], method="eigh") == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_singular_covariances():
    # fewer samples than dimensions: rank-deficient covariances, as with a few images and 2048 features
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 40))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    y = rng.normal(size=(6, 40)) + 1.0
    fid = M.frechet_distance(mu, sigma, y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fid) and fid > 0
    assert M.frechet_distance(mu, sigma, y.mean(0), np.cov(y, rowvar=False), method="eigh") == pytest.approx(fid, rel=1e-4)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma, method="eigh")) < 1e-4
    zero = np.zeros((40, 40))
    assert M.frechet_distance(mu, zero, mu + 1.0, zero) == pytest.approx(40.0, abs=1e-3)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_uniform_predictions_is_one():
    probs = np.full((50, 7), 1 / 7)
    mean, std = M.inception_score(probs, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = M.inception_score(torch.zeros(50, 7), splits=5)  # equal logits
    assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_distinct_is_num_classes():
    k = 10
    probs = np.eye(k)[np.tile(np.arange(k), 10)]  # 100 one-hot rows, every class 10 times
    assert M.inception_score(probs, splits=1)[0] == pytest.approx(k, rel=1e-12)
    mean, std = M.inception_score(probs, splits=10, shuffle=False)  # every split holds all classes
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    logits = 60.0 * torch.from_numpy(probs)  # near one-hot after softmax
    assert M.inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-6)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(5).normal(size=(103, 17)) * 3)
    ref = isc_features_to_metric(logits, splits=10)
    mean, std = M.inception_score(logits, splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        M.inception_score(np.zeros(5), splits=1)


# --------------------------------------------------------------------------------------------
# statistics files
# --------------------------------------------------------------------------------------------


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
    with pytest.raises(M.StatisticsError):
        M.save_statistics(tmp_path / "s.npz", np.zeros(3), np.zeros((3, 4)))
    assert not os.listdir(tmp_path)


def test_load_statistics_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        M.load_statistics(tmp_path / "adm_in256_stats.npz")
    msg = str(ei.value)
    assert "adm_in256_stats.npz" in msg and "--fid_stats" in msg and "lpd.metrics stats" in msg


def test_load_statistics_wrong_content_is_clear(tmp_path):
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(M.StatisticsError, match=r"'mu' and 'sigma'.*arr_0"):
        M.load_statistics(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(M.StatisticsError, match="cannot read"):
        M.load_statistics(tmp_path / "junk.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(M.StatisticsError, match="mu"):
        M.load_statistics(tmp_path / "shape.npz")


def test_load_statistics_accepts_adm_reference_batch_layout(tmp_path):
    # ADM's reference batches hold mu/sigma next to other entries
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=np.ones(4), sigma=np.eye(4),
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    mu, sigma = M.load_statistics(tmp_path / "ref.npz")
    assert mu.shape == (4,) and sigma.shape == (4, 4) and mu.dtype == np.float64


# --------------------------------------------------------------------------------------------
# image sources and statistics
# --------------------------------------------------------------------------------------------


def test_compute_statistics_matches_numpy():
    images = _images(30)
    feats, logits = _reference_features(images)
    stats = M.compute_statistics(images, TinyExtractor(), batch_size=7, progress=False)
    assert stats.num_images == 30
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.logits, logits, rtol=1e-5, atol=1e-5)


def test_sources_folder_npz_npy_arrays_and_batches_agree(tmp_path):
    images = _images(24)
    folder = _write_folder(tmp_path / "png", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    np.save(tmp_path / "samples.npy", images)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    sources = [folder, str(tmp_path / "samples.npz"), tmp_path / "compressed.npz", str(tmp_path / "samples.npy"),
               images, nchw, [nchw[:10], images[10:]]]
    ref = M.compute_statistics(images, TinyExtractor(), batch_size=5, progress=False)
    for src in sources:
        stats = M.compute_statistics(src, TinyExtractor(), batch_size=5, progress=False)
        assert stats.num_images == 24
        np.testing.assert_allclose(stats.mu, ref.mu, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, ref.sigma, atol=1e-12)
        # float32 GEMMs of other batch shapes round differently on some CPUs (8e-6 seen on AMD EPYC)
        np.testing.assert_allclose(stats.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert M.count_images(folder) == 24 and M.count_images(str(tmp_path / "samples.npz")) == 24
    batches = list(M.iter_image_batches(str(tmp_path / "samples.npz"), batch_size=10))
    assert [b.shape[0] for b in batches] == [10, 10, 4]
    assert torch.equal(torch.cat(batches), nchw)


def test_bad_image_sources_are_clear(tmp_path):
    ex = TinyExtractor()
    with pytest.raises(TypeError, match="uint8"):
        M.compute_statistics(np.zeros((4, 8, 8, 3), np.float32), ex, progress=False)
    with pytest.raises(ValueError, match="RGB"):
        M.compute_statistics(np.zeros((4, 8, 8, 1), np.uint8), ex, progress=False)
    np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        M.compute_statistics(str(tmp_path / "noarr.npz"), ex, progress=False)
    with pytest.raises(FileNotFoundError):
        M.compute_statistics(str(tmp_path / "missing.npz"), ex, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        M.compute_statistics(str(tmp_path / "empty"), ex, progress=False)
    mixed = tmp_path / "mixed"
    _write_folder(mixed, _images(2, size=8))
    Image.fromarray(_images(1, size=12)[0]).save(mixed / "00009.png")
    with pytest.raises(ValueError, match="different sizes"):
        M.compute_statistics(str(mixed), ex, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        M.compute_statistics(_images(1), ex, progress=False)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def test_end_to_end_folder_and_npz_against_own_statistics(tmp_path):
    images = _images(40)
    folder = _write_folder(tmp_path / "samples", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    stats = M.compute_statistics(folder, TinyExtractor(), batch_size=8, progress=False)
    M.save_statistics(tmp_path / "ref.npz", stats.mu, stats.sigma)
    for src in (folder, str(tmp_path / "samples.npz")):
        out = M.compute_metrics(src, str(tmp_path / "ref.npz"), TinyExtractor(), batch_size=16, progress=False)
        assert out["num_images"] == 40
        assert abs(out["fid"]) < 1e-6
        is_mean, is_std = M.inception_score(_reference_features(images)[1], splits=10)
        assert out["inception_score"] == pytest.approx(is_mean, rel=1e-5)
        assert out["inception_score_std"] == pytest.approx(is_std, rel=1e-4, abs=1e-6)
    other = M.compute_metrics(_images(40, seed=9), (stats.mu, stats.sigma), TinyExtractor(), progress=False)
    assert other["fid"] > 1e-3


def test_compute_metrics_without_reference_or_logits():
    out = M.compute_metrics(_images(12), None, TinyExtractor(), progress=False)
    assert out["fid"] is None and out["inception_score"] > 1.0
    stats = M.compute_statistics(_images(12), TinyExtractor(with_logits=False), progress=False)
    assert stats.logits is None
    out = M.metrics_from_statistics(stats, (stats.mu, stats.sigma))
    assert abs(out["fid"]) < 1e-6 and out["inception_score"] is None
    with pytest.warns(UserWarning, match="splits"):
        M.compute_metrics(_images(4), None, TinyExtractor(), progress=False)


def test_compute_metrics_checks_reference_before_reading_images(tmp_path):
    def never(_):
        raise AssertionError("images were processed before the reference was checked")

    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        M.compute_metrics(_images(4), str(tmp_path / "adm_in256_stats.npz"), never, progress=False)


def test_reference_of_another_extractor_is_refused():
    with pytest.raises(M.StatisticsError, match="2048-d"):
        M.compute_metrics(_images(8), (np.zeros(2048), np.eye(2048)), TinyExtractor(), progress=False)


def test_extractor_output_forms():
    images = _images(10)
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    feats = TinyExtractor()(t)["features"]
    forms = [
        lambda x: TinyExtractor()(x)["features"],
        lambda x: (TinyExtractor()(x)["features"],),
        lambda x: (TinyExtractor()(x)["features"], None),
        lambda x: TinyExtractor()(x)["features"].numpy(),
        lambda x: {"features": TinyExtractor()(x)["features"]},
    ]
    for f in forms:
        stats = M.compute_statistics(images, f, progress=False)
        np.testing.assert_allclose(stats.mu, feats.double().mean(0).numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="features"):
        M.compute_statistics(images, lambda x: {"pool": x}, progress=False)


# --------------------------------------------------------------------------------------------
# torch-fidelity's registry route
# --------------------------------------------------------------------------------------------

from torch_fidelity import register_feature_extractor  # noqa: E402
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # noqa: E402


class TinyTorchFidelityExtractor(FeatureExtractorBase):
    """A torch-fidelity extractor with the Inception constructor's weights convention."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.inner = TinyExtractor()
        if feature_extractor_weights_path is not None:
            # like torch-fidelity's Inception: weights_only=False at the call site
            state = torch.load(feature_extractor_weights_path, weights_only=False)
            self.inner.load_state_dict(state)

    @staticmethod
    def get_provided_features_list():
        return "pool48", "logits10"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "pool48", "isc": "logits10", "kid": "pool48", "prc": "pool48"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        out = self.inner(x)
        named = {"pool48": out["features"], "logits10": out["logits"]}
        return tuple(named[k] for k in self.features_list)


TINY_NAME = "lpd-test-tiny"
if TINY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TINY_NAME, TinyTorchFidelityExtractor)


def test_registered_extractor_end_to_end(tmp_path):
    images = _images(20)
    folder = _write_folder(tmp_path / "samples", images)
    ex = M.create_extractor(TINY_NAME, device="cpu")
    assert (ex.features_name, ex.logits_name) == ("pool48", "logits10")
    ref = M.compute_statistics(images, TinyExtractor(), progress=False)
    M.save_statistics(tmp_path / "ref.npz", ref.mu, ref.sigma)
    out = M.compute_metrics(folder, str(tmp_path / "ref.npz"), ex, batch_size=6, progress=False)
    assert abs(out["fid"]) < 1e-6
    direct = M.compute_metrics(folder, None, TinyExtractor(), progress=False)
    assert out["inception_score"] == pytest.approx(direct["inception_score"], rel=1e-6)
    only_features = M.create_extractor(TINY_NAME, logits=None)
    assert M.compute_statistics(images, only_features, progress=False).logits is None
    with pytest.raises(ValueError, match="not registered"):
        M.create_extractor("no-such-extractor")


def test_weights_files_are_loaded_weights_only(tmp_path):
    good = tmp_path / "good.pth"
    state = TinyExtractor().state_dict()
    state["w"] = state["w"] * 2
    torch.save(state, good)
    ex = M.create_extractor(TINY_NAME, weights_path=good)
    assert torch.equal(ex.extractor.inner.w, state["w"])
    evil = tmp_path / "evil.pth"
    torch.save({"w": state["w"], "args": argparse.Namespace(a=1)}, evil)  # arbitrary pickled object
    before = dict(os.environ)
    with pytest.raises(ValueError, match="weights_only=True"):
        M.create_extractor(TINY_NAME, weights_path=evil)
    assert dict(os.environ) == before  # the forcing switch is restored


# --------------------------------------------------------------------------------------------
# Inception weights offline
# --------------------------------------------------------------------------------------------


def test_inception_url_matches_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert M.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3


def test_missing_inception_weights_path_never_downloads(tmp_path, no_download):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError) as ei:
        M.inception_extractor(missing)
    msg = str(ei.value)
    assert str(missing) in msg and "--inception_weights" in msg and M.INCEPTION_WEIGHTS_URL in msg
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        M.compute_metrics(_images(4), None, inception_weights=missing, progress=False)


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


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def test_cli_stats_and_fid(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "inception_extractor", lambda weights=None, device="cpu", **k: TinyExtractor())
    images = _images(20)
    folder = _write_folder(tmp_path / "ref", images)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    assert M.main(["stats", "--input", folder, "--output", str(tmp_path / "ref.npz"), "--device", "cpu",
                   "--no_progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert M.main(["fid", "--input", str(tmp_path / "samples.npz"), "--stats", str(tmp_path / "ref.npz"),
                   "--device", "cpu", "--no_progress", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FID ") and abs(float(out.split()[1])) < 1e-4 and "IS" in out and "20 images" in out
    import json

    assert abs(json.loads((tmp_path / "m.json").read_text())["fid"]) < 1e-6


def test_cli_errors_are_clear(tmp_path, capsys, no_download):
    folder = _write_folder(tmp_path / "ref", _images(3))
    code = M.main(["stats", "--input", folder, "--output", str(tmp_path / "o.npz"), "--device", "cpu",
                   "--inception_weights", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert code == 1 and "--inception_weights" in err and "nope.pth" in err
    code = M.main(["fid", "--input", folder, "--stats", str(tmp_path / "missing.npz"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "--fid_stats" in err and "missing.npz" in err


# --------------------------------------------------------------------------------------------
# the real torch-fidelity Inception-v3 (random weights saved like the released file; ~20 s on 2 cores)
# --------------------------------------------------------------------------------------------


def test_real_inception_with_random_weights(tmp_path, monkeypatch, no_download):
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    # a random state dict with Inception's exact keys and shapes, saved like the released weights
    monkeypatch.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    monkeypatch.setattr(fi, "load_state_dict_from_url", lambda *a, **k: {})
    model = fi.FeatureExtractorInceptionV3(M.INCEPTION_NAME, ["2048"])
    monkeypatch.undo()
    weights = tmp_path / "inception.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, weights)
    del model

    ex = M.inception_extractor(weights, "cpu")
    images = _images(3, size=32)
    stats = M.compute_statistics(images, ex, batch_size=3, progress=False)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    assert stats.logits.shape == (3, 1008)
    out = M.metrics_from_statistics(stats, (stats.mu, stats.sigma), splits=1, fid_method="eigh")
    assert abs(out["fid"]) < 1e-2 and out["inception_score"] >= 1.0
