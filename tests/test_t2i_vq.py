"""LlamaGen's text-to-image VQ (vq_ds16_t2i.pt) by name: resolved from a Hugging Face cache that
the test lays out (offline), a local file of that name wins, training records the name and a
recorded name is found again, and python -m lpd.download fetches it alone."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import fixture_path
from test_hub import fake_cache

import lpd.tokenizer
from lpd import download, hub
from lpd.tokenizer import make_tokenizer, recorded_tokenizer, tokenizer_ref

T2I = "vq_ds16_t2i.pt"


def _weights(vq, path, scale=1.0):
    torch.save({"model": {k: v * scale for k, v in vq.state_dict().items()}}, path)
    return path


@pytest.fixture
def cache(monkeypatch, tmp_path, tiny_vq):
    """Offline, a Hub cache holding only the t2i VQ (the tiny VQ's weights), an empty cwd."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = fake_cache(tmp_path / "hub", hub.VQ_REPO, T2I)
    _weights(tiny_vq, path)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return path


@pytest.fixture(scope="module")
def lpd_vq_config():
    """The tiny VQ's architecture (--vq_config)."""
    return torch.load(fixture_path("vq_parity_tiny.pt"), weights_only=True)["config"]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_t2i_vq_by_name_comes_from_the_hub_cache(cache, tiny_vq, lpd_vq_config):
    assert os.path.samefile(hub.resolve_vq(T2I), cache)
    assert same(make_tokenizer("vq", T2I, lpd_vq_config), tiny_vq)
    with pytest.raises(hub.ResolveError, match="vq_ds16_c2i.pt"):  # the other one is not cached
        hub.resolve_vq("vq_ds16_c2i.pt")
    with pytest.raises(hub.ResolveError, match="does not exist"):  # not a released name
        hub.resolve_vq("vq_ds16_x.pt")
    _weights(tiny_vq, T2I, scale=0.5)  # a file of that name here wins
    assert hub.resolve_vq(T2I) == T2I
    assert not same(make_tokenizer("vq", T2I, lpd_vq_config), tiny_vq)


def test_training_records_the_name_and_it_is_found_again(
    cache, tiny_vq, lpd_vq_config, monkeypatch
):
    for given in (T2I, os.path.join("/some/folder", T2I)):
        ref = tokenizer_ref({"tokenizer": "vq", "vqgan_path": given})
        assert ref == {"kind": "vq", "file": T2I}
    load = lpd.tokenizer.load_vq  # the recorded file, read with the tiny VQ's architecture
    monkeypatch.setattr(lpd.tokenizer, "load_vq", lambda path, **c: load(path, **lpd_vq_config))
    assert same(recorded_tokenizer(ref, None, "cpu", "ckpt.pth"), tiny_vq)
    with pytest.raises(
        ValueError, match="tokenizer file my_vq.pt; pass its path with --vqgan_path"
    ):
        recorded_tokenizer({"kind": "vq", "file": "my_vq.pt"}, None, "cpu", "ckpt.pth")


def test_download_fetches_a_vq_alone(cache, monkeypatch, capsys):
    assert download.main([T2I, "--list"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"hf download {hub.VQ_REPO} {T2I}")
    assert download.main([T2I]) == 0
    assert os.path.samefile(capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1], cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache) + "-empty")
    assert download.main([T2I]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Could not get the VQ tokenizer (vq_ds16_t2i.pt)")
        and "HF_HUB_OFFLINE" in err
    )
    with pytest.raises(SystemExit) as e:
        download.main(["lpd_l"])
    assert e.value.code == 2 and "give the image size of lpd_l" in capsys.readouterr().err
