"""python -m lpd.download against a fake Hugging Face Hub and file server on 127.0.0.1 (no network):
it fills the caches that main_eval.py reads, so that an offline run finds every file; offline with empty
caches it names every missing file in one error."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import urllib.parse

import numpy as np
import pytest
from huggingface_hub import constants

from lpd import download, hub, metrics

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self, body: bool) -> None:
        data = self.server.files.get(urllib.parse.unquote(self.path.split("?")[0]))
        self.send_response(404 if data is None else 200)
        self.send_header("Content-Length", "0" if data is None else str(len(data)))
        if data is not None:  # what huggingface_hub reads from a Hub file's answer
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body and data is not None:
            self.wfile.write(data)
        self.server.requests.append(self.path)

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(False)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(True)

    def log_message(self, *args) -> None:
        pass


def _stats_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, mu=np.zeros(4), sigma=np.eye(4))
    return buf.getvalue()


@pytest.fixture
def caches(monkeypatch, tmp_path):
    """Empty caches in tmp_path for the Hub, the ADM statistics and torch hub; online mode."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LPD_CACHE", str(tmp_path / "lpd"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.chdir(tmp_path)  # no ./fid_stats of the checkout
    return tmp_path


@pytest.fixture
def fake_hub(caches, monkeypatch):
    """A Hub and a file server on 127.0.0.1 holding the four files of lpd_l at 256 px."""
    files = {
        "/mit-han-lab/lpd_l_256/resolve/main/lpd_l_256.pth": b"checkpoint bytes",
        "/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt": b"vq bytes",
        "/files/adm_in256_stats.npz": _stats_bytes(),
        "/files/weights-inception.pth": b"inception bytes",
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.requests = files, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setitem(hub.FID_STATS_SOURCES, 256, (url + "/files/adm_in256_stats.npz",))
        monkeypatch.setattr(metrics, "INCEPTION_WEIGHTS_URL", url + "/files/weights-inception.pth")
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_fills_the_caches_that_an_offline_run_reads(fake_hub, caches, monkeypatch, capsys):
    assert download.main(["lpd_l", "256"]) == 0
    out = capsys.readouterr().out
    assert (
        "hf download mit-han-lab/lpd_l_256 lpd_l_256.pth" in out
        and "hf download FoundationVision/LlamaGen" in out
    )
    assert (
        "curl -fL --create-dirs -o " + str(caches / "lpd" / "fid_stats" / "adm_in256_stats.npz")
        in out
    )
    assert len([r for r in fake_hub.requests if r.startswith("/files/")]) == 2
    # offline now: every resolver main_eval.py uses finds its file, with the served bytes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = {name: open(path, "rb").read() for name, path in download.fetch("lpd_l", 256).items()}
    assert got == {
        "checkpoint": b"checkpoint bytes",
        "VQ tokenizer": b"vq bytes",
        "ADM statistics": _stats_bytes(),
        "Inception weights": b"inception bytes",
    }
    assert metrics.resolve_inception_weights().startswith(
        str(caches / "torch" / "hub" / "checkpoints")
    )
    served = len(fake_hub.requests)
    assert (
        download.main(["lpd_l", "256"]) == 0 and len(fake_hub.requests) == served
    )  # a rerun fetches nothing


def test_offline_names_every_missing_file_at_once(caches, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download.main(["lpd_xl", "512"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(
        "error: 4 files are missing (checkpoint, VQ tokenizer, ADM statistics, Inception weights):"
    )
    assert "Traceback" not in err
    for part in (
        "mit-han-lab/lpd_xl_512",
        "FoundationVision/LlamaGen",
        "adm_in512_stats.npz",
        "Inception-v3",
    ):
        assert part in err, part
    assert (
        "hf download mit-han-lab/lpd_xl_512 lpd_xl_512.pth" in captured.out
    )  # the list to run elsewhere
    assert not os.path.exists(caches / "hf") or not any(os.scandir(caches / "hf"))


def test_list_fetches_nothing_and_unreleased_pairs_are_refused(caches, capsys):
    assert download.main(["lpd_xxl", "256", "--list"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("hf download") == 2 and out.count("curl") == 2 and not (caches / "lpd").exists()
    )
    assert download.main(["lpd_xxl", "512"]) == 2
    assert "lpd_xxl was not released at 512 px" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        download.main(["lpd_huge", "256"])
    assert e.value.code == 2
