"""The app in a subprocess on a free local port, and the system Chromium under Playwright: for the
browser tests and the screenshots (never a browser that a package downloads)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

__all__ = ["CHROMIUM_ARGS", "chromium_path", "serve", "browser", "paint"]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The system Chromium, or a RuntimeError saying how to install it."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name) or (
            f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
        ):
            return path
    raise RuntimeError(
        "Chromium is not installed: run `apt-get install -y chromium` as root (.ci/run does this); "
        "the browser tests drive the system Chromium, never a downloaded one"
    )


@contextlib.contextmanager
def serve(args: Sequence[str] = (), timeout: float = 300.0) -> Iterator[str]:
    """Run ``python -m lpd.app --port 0 ARGS``; yields its URL once it serves, then stops it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpd.app", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True
    ).start()
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"python -m lpd.app did not serve within {timeout:.0f} s; it printed:\n"
                    + "".join(seen)
                ) from None
            if line is None:
                raise RuntimeError(
                    f"python -m lpd.app exited with status {proc.wait()}:\n" + "".join(seen)
                )
            seen.append(line)
            if m := re.search(r"Running on local URL:\s*(http://\S+)", line):
                break
        yield m.group(1).rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A headless system Chromium under Playwright (``playwright.sync_api.Browser``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def paint(page: object, dx: float = 60, dy: float = 30) -> None:
    """Once the editor shows its image: a brush stroke ``2 dx`` wide, ``dy`` below the centre."""
    page.locator("#editor").get_by_text("Upload an image").wait_for(state="hidden")
    box = page.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - dx, cy + dy, steps=8)  # in small moves: the canvas sees the pointer arrive
    page.mouse.down()
    for i in range(13):
        page.mouse.move(cx - dx + 2 * dx * i / 12, cy + dy, steps=2)
    page.mouse.up()
