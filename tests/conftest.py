"""Shared test helpers: fixture paths, small models, and processes that never outlive their test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# Keep the suite deterministic and light on a 2-core machine.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="session")
def lpd_parity():
    return torch.load(fixture_path("lpd_parity_8x8.pt"), weights_only=True)


@pytest.fixture(scope="session")
def manifest():
    import json

    with open(fixture_path("state_dict_manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_vq():
    """The tiny real VQ tokenizer of the parity fixture (16x downsampling, 256 codes), in eval mode."""
    from lpd.tokenizer import build_vq

    parity = torch.load(fixture_path("vq_parity_tiny.pt"), weights_only=True)
    vq = build_vq(**parity["config"])
    vq.load_state_dict(parity["state_dict"], strict=True)
    return vq.eval()


# ---------------------------------------------------------------------------------------------- processes


@contextlib.contextmanager
def background(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """``cmd`` started in a process group of its own; the whole group (torchrun's workers, DataLoader
    workers) is killed on the way out, whether the test passed, failed or timed out."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def run_process(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` through :func:`background`."""
    with background(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wait_for_file(path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Wait until ``path`` exists; fail with ``what`` if ``proc`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
