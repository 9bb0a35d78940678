"""Tests of lpd.hub: released files resolve through a (fake, on-disk) Hugging Face cache, user
paths win, and every failure (offline, no network, missing repository or file, missing path)
gives an error naming the file, the repository, the URL and the flag.  No network is used:
downloads are either forbidden (offline) or replaced by stand-ins."""

from __future__ import annotations

import os
import urllib.error
import warnings

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import errors as hf_errors

from lpd import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(
    root, repo_id: str, filename: str, content: bytes = b"weights", commit: str = COMMIT
) -> str:
    """Lay out ``root/models--ORG--NAME/{refs/main, snapshots/<commit>/<filename>}`` like huggingface_hub."""
    repo_dir = os.path.join(os.fspath(root), "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    path = os.path.join(repo_dir, "snapshots", commit, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, an empty default cache, and no network call allowed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LPD_CACHE", str(tmp_path / "lpd-cache"))
    real = huggingface_hub.hf_hub_download

    def cache_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "a Hub download was attempted while offline"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setattr(
        hub, "_download_url", lambda *a, **k: pytest.fail("a URL download was attempted")
    )


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode (whatever the environment says), with an empty cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("LPD_CACHE", str(tmp_path / "lpd-cache"))


def _http_error(cls, message: str, url: str):
    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub
        import httpx
    response = httpx.Response(404, request=httpx.Request("GET", url))
    return cls(message, response=response)


def _hub_stub(monkeypatch, remote: dict[str, BaseException | str]):
    """Replace hf_hub_download: the cache is empty, a download gives remote[filename]."""
    calls = []

    def stub(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, bool(kwargs.get("local_files_only"))))
        if kwargs.get("local_files_only"):
            raise hf_errors.LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache"
            )
        result = remote[filename]
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", stub)
    return calls


# --------------------------------------------------------------------------------------------
# resolving from the cache
# --------------------------------------------------------------------------------------------


def test_resolve_from_cache_dir_offline(offline, tmp_path):
    cache = tmp_path / "hub"
    ckpt = fake_cache(cache, "mit-han-lab/lpd_xxl_256", "lpd_xxl_256.pth")
    vq = fake_cache(cache, "FoundationVision/LlamaGen", "vq_ds16_c2i.pt")
    assert os.path.samefile(hub.resolve_checkpoint("lpd_xxl", 256, cache_dir=cache), ckpt)
    assert os.path.samefile(hub.resolve_vq(cache_dir=cache), vq)


def test_default_cache_is_huggingface_hubs_own(offline, monkeypatch, tmp_path):
    ckpt = fake_cache(tmp_path / "hf-home" / "hub", "mit-han-lab/lpd_l_512", "lpd_l_512.pth")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub")
    )
    assert os.path.samefile(hub.resolve_checkpoint("lpd_l", 512), ckpt)
    # HF_HUB_CACHE set after huggingface_hub was imported counts too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    assert os.path.samefile(hub.resolve_checkpoint("lpd_l", 512), ckpt)


def test_unknown_released_checkpoint(offline):
    with pytest.raises(hub.ResolveError, match="lpd_xxl at 256px") as ei:
        hub.resolve_checkpoint("lpd_xxl", 512)
    assert "--pretrained_ckpt" in str(ei.value) and "--random_init" in str(ei.value)


def test_cached_checkpoint_under_another_name_is_found(offline, tmp_path):
    other = fake_cache(tmp_path / "hub", "mit-han-lab/lpd_l_256", "checkpoint-last.pth")
    fake_cache(tmp_path / "hub", "mit-han-lab/lpd_l_256", "README.md", b"card")
    with pytest.warns(UserWarning, match="checkpoint-last.pth"):
        got = hub.resolve_checkpoint("lpd_l", 256, cache_dir=tmp_path / "hub")
    assert os.path.samefile(got, other)
    # two candidates: ambiguous, so the error names the expected file
    fake_cache(tmp_path / "hub", "mit-han-lab/lpd_l_256", "checkpoint-best.pth")
    with pytest.raises(hub.ResolveError, match="lpd_l_256.pth"):
        hub.resolve_checkpoint("lpd_l", 256, cache_dir=tmp_path / "hub")


# --------------------------------------------------------------------------------------------
# user paths
# --------------------------------------------------------------------------------------------


def test_explicit_paths_win_and_must_exist(offline, tmp_path):
    given = tmp_path / "my.pth"
    given.write_bytes(b"x")
    assert hub.resolve_checkpoint("lpd_l", 256, path=given) == str(given)
    assert hub.resolve_vq(path=str(given)) == str(given)
    cases = [
        (lambda p: hub.resolve_checkpoint("lpd_l", 256, path=p), "--pretrained_ckpt"),
        (lambda p: hub.resolve_vq(path=p), "--vqgan_path"),
        (lambda p: hub.resolve_fid_stats(256, path=p), "--fid_stats"),
    ]
    for resolve, flag in cases:
        with pytest.raises(FileNotFoundError) as ei:
            resolve(tmp_path / "missing.file")
        msg = str(ei.value)
        assert "missing.file" in msg and "does not exist" in msg and flag in msg
        assert isinstance(ei.value, hub.ResolveError)
    with pytest.raises(hub.ResolveError, match="directory"):
        hub.resolve_vq(path=tmp_path)
    # unknown model with a path: the path is all that counts
    assert hub.resolve_checkpoint("lpd_custom", 128, path=given) == str(given)


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------


def test_offline_and_not_cached_is_clear(offline, tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        hub.resolve_checkpoint("lpd_xl", 256)
    msg = str(ei.value)
    for part in (
        "lpd_xl_256.pth",
        "mit-han-lab/lpd_xl_256",
        "HF_HUB_OFFLINE",
        "https://huggingface.co/mit-han-lab/lpd_xl_256/resolve/main/lpd_xl_256.pth",
        "--pretrained_ckpt",
        str(tmp_path / "empty-cache"),
        "hf download mit-han-lab/lpd_xl_256",
    ):
        assert part in msg, part
    assert "Traceback" not in msg
    with pytest.raises(hub.ResolveError) as ei:
        hub.resolve_vq()
    assert "FoundationVision/LlamaGen" in str(ei.value) and "--vqgan_path" in str(ei.value)


def test_offline_read_by_huggingface_hub_at_import_counts(offline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.ResolveError, match="HF_HUB_OFFLINE"):
        hub.resolve_vq()
    with pytest.raises(hub.ResolveError, match="offline"):
        hub.resolve_fid_stats(512)


def test_no_network_is_clear(online, monkeypatch):
    cause = ConnectionError("[Errno -2] Name or service not known")
    err = hf_errors.LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub"
    )
    err.__cause__ = cause
    calls = _hub_stub(monkeypatch, {"vq_ds16_c2i.pt": err})
    with pytest.raises(hub.ResolveError) as ei:
        hub.resolve_vq()
    msg = str(ei.value)
    assert "could not be reached" in msg and "Name or service not known" in msg
    assert "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt" in msg
    assert "--vqgan_path" in msg
    assert calls == [
        ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", True),
        ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", False),
    ]  # cache first, then network


def test_missing_repository_is_clear(online, monkeypatch):
    url = "https://huggingface.co/mit-han-lab/lpd_l_256/resolve/main/lpd_l_256.pth"
    _hub_stub(
        monkeypatch,
        {
            "lpd_l_256.pth": _http_error(
                hf_errors.RepositoryNotFoundError, "404 Client Error. Repository Not Found", url
            )
        },
    )
    with pytest.raises(hub.ResolveError) as ei:
        hub.resolve_checkpoint("lpd_l", 256)
    msg = str(ei.value)
    assert "does not exist or is private" in msg and "mit-han-lab/lpd_l_256" in msg and url in msg


def test_missing_file_falls_back_to_the_single_checkpoint(online, monkeypatch, tmp_path):
    url = "https://huggingface.co/mit-han-lab/lpd_xl_512/resolve/main/lpd_xl_512.pth"
    real_file = tmp_path / "checkpoint-last.pth"
    real_file.write_bytes(b"x")
    _hub_stub(
        monkeypatch,
        {
            "lpd_xl_512.pth": _http_error(
                hf_errors.RemoteEntryNotFoundError, "404 Entry Not Found", url
            ),
            "checkpoint-last.pth": str(real_file),
        },
    )
    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_files",
        lambda repo_id, **k: [".gitattributes", "README.md", "checkpoint-last.pth"],
    )
    with pytest.warns(UserWarning, match="checkpoint-last.pth"):
        assert hub.resolve_checkpoint("lpd_xl", 512) == str(real_file)
    # two candidates: ambiguous, so the error names the expected file
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **k: ["a.pth", "b.pth"])
    with pytest.raises(hub.ResolveError) as ei:
        hub.resolve_checkpoint("lpd_xl", 512)
    assert "has no file lpd_xl_512.pth" in str(ei.value) and url in str(ei.value)


# --------------------------------------------------------------------------------------------
# plain-URL files: ADM statistics
# --------------------------------------------------------------------------------------------


def _stats_file(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4))


def test_fid_stats_found_locally(offline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _stats_file(tmp_path / "fid_stats" / "adm_in256_stats.npz")
    assert hub.resolve_fid_stats(256) == os.path.join("fid_stats", "adm_in256_stats.npz")
    _stats_file(tmp_path / "lpd-cache" / "fid_stats" / "adm_in512_stats.npz")
    assert hub.resolve_fid_stats(512) == str(
        tmp_path / "lpd-cache" / "fid_stats" / "adm_in512_stats.npz"
    )


def test_fid_stats_missing_offline_is_clear(offline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as ei:
        hub.resolve_fid_stats(256)
    msg = str(ei.value)
    for part in (
        "adm_in256_stats.npz",
        "--fid_stats",
        "offline",
        "github.com/LTH14/mar",
        str(tmp_path / "lpd-cache" / "fid_stats"),
        "python -m lpd.metrics stats",
    ):
        assert part in msg, part
    with pytest.raises(hub.ResolveError, match="No reference statistics are known for 64px"):
        hub.resolve_fid_stats(64)


def test_fid_stats_download_is_validated_and_atomic(online, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tried = []

    def fake_download(url, dst):
        tried.append(url)
        if "LTH14" in url:  # first source serves something that is not a statistics file
            with open(dst, "wb") as f:
                f.write(b"<html>not found</html>")
        else:
            _stats_file(dst)

    monkeypatch.setattr(hub, "_download_url", fake_download)
    got = hub.resolve_fid_stats(256)
    assert got == str(tmp_path / "lpd-cache" / "fid_stats" / "adm_in256_stats.npz")
    assert tried == list(hub.FID_STATS_SOURCES[256])
    with np.load(got) as data:
        assert sorted(data.files) == ["mu", "sigma"]

    def failing(url, dst):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_download_url", failing)
    with pytest.raises(hub.ResolveError) as ei:
        hub.resolve_fid_stats(512)
    msg = str(ei.value)
    assert "download failed" in msg and "Name or service not known" in msg and "--fid_stats" in msg
    assert not os.path.exists(tmp_path / "lpd-cache" / "fid_stats" / "adm_in512_stats.npz")


def test_url_download_is_atomic(online, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 100)
    cache = tmp_path / "cache"

    def reject(path):  # sees the whole download before it reaches the cache
        assert open(path, "rb").read() == src.read_bytes() and not (cache / "src.bin").exists()
        raise ValueError("bad payload")

    with pytest.raises(hub.ResolveError, match="bad payload"):
        hub.url_file(src.as_uri(), cache_dir=cache, validate=reject)
    with pytest.raises(hub.ResolveError, match="download failed"):
        hub.url_file((tmp_path / "nope.bin").as_uri(), cache_dir=cache)
    assert os.listdir(cache) == []  # no partial or rejected file left
    with pytest.raises(hub.ResolveError, match="downloads are disabled"):
        hub.url_file(src.as_uri(), cache_dir=cache, download=False, flag="--weights")
    assert os.listdir(cache) == []


def test_url_file_end_to_end_with_file_url(online, tmp_path):
    src = tmp_path / "weights.pth"
    src.write_bytes(b"w")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hub.url_file(src.as_uri(), cache_dir=tmp_path / "cache", flag="--weights")
    assert got == str(tmp_path / "cache" / "weights.pth") and open(got, "rb").read() == b"w"
    src.unlink()
    assert hub.url_file(src.as_uri(), cache_dir=tmp_path / "cache") == got  # cached: no download
