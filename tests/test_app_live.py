"""``python -m lpd.app`` served on a free local port with the embedded model: its API through
gradio_client, the page in the system Chromium (Playwright), and a service that holds up (queue,
bounds, file serving)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from lpd.app.harness import browser, paint, serve
from lpd.app.load import EMBEDDED_DIR
from lpd.pipeline import LPDPipeline

MAX_PIXELS = 1_000_000
WAIT_MS = 180_000  # the longest wait for anything in the page (bounded; ends with the test failing)


@pytest.fixture(scope="module")
def url():
    with serve(["--max_upload_mb", "1", "--max_pixels", str(MAX_PIXELS)]) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False, download_files=True)


def _png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _write(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _editor(background: str, layer: str | None = None) -> dict:
    return {
        "background": handle_file(background),
        "layers": [handle_file(layer)] if layer else [],
        "composite": None,
    }


def test_generate_matches_the_pipeline(client):
    image, heat, files, status = client.predict(
        "7", "", 12, 5.0, 2.0, "lpd", 3, api_name="/generate"
    )
    pixels = _png(image)
    assert pixels.shape == (256, 256, 3) and pixels.std() > 0 and "done" in status
    ref = LPDPipeline.from_pretrained(EMBEDDED_DIR, device="cpu")(
        [7], steps=12, seed=3, cfg=5.0, repulsion_threshold=2.0
    )
    assert np.array_equal(
        pixels, ref[0]
    )  # the streamed decode ends where the library's sampling does
    settings = json.loads(
        open(next(f for f in files if f.endswith(".json")), encoding="utf-8").read()
    )
    assert settings["seed"] == 3 and settings["steps"] == 12 and len(settings["group_sizes"]) == 12
    assert np.array_equal(_png(next(f for f in files if f.endswith(".png"))), pixels)
    assert _png(heat).shape[0] > 256


def test_edit_keeps_the_unpainted_tokens(client, tmp_path):
    source = np.zeros((256, 256, 3), np.uint8)
    source[32:224, 96:160] = (
        255  # whole 16x16 patches: the palette tokenizer gives them back exactly
    )
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[128:, :, :] = (255, 0, 255, 255)  # the lower half painted
    src, masked, edits = client.predict(
        _editor(_write(tmp_path / "s.png", source), _write(tmp_path / "l.png", layer)),
        "3",
        "",
        8,
        3,
        0,
        api_name="/edit",
    )
    assert np.array_equal(_png(src), source)
    assert len(edits) == 3
    for e in edits:
        out = _png(e["image"])
        assert np.array_equal(
            out[:128], source[:128]
        )  # the palette tokenizer is exact: kept tokens, kept pixels
    assert not all(np.array_equal(_png(e["image"])[128:], source[128:]) for e in edits)


def test_orders(client):
    picture, stats = client.predict(512, 48, 4.0, 0, api_name="/orders")
    assert _png(picture).shape[1] > 512 and "32x32 tokens in 48 steps" in stats


def _error(client, *args, api_name: str) -> str:
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


def test_bad_inputs_get_a_message_and_the_server_keeps_serving(client, tmp_path):
    assert "maximum" in _error(client, "7", "", 999, 5.0, 2.0, "lpd", 0, api_name="/generate")
    assert "not in the list of choices" in _error(
        client, "seven", "", 8, 5.0, 2.0, "lpd", 0, api_name="/generate"
    )
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 50)
    assert "not a readable image" in _error(
        client, _editor(str(bad)), "3", "", 8, 1, 0, api_name="/edit"
    )
    flat = tmp_path / "large.png"
    Image.new("RGB", (1200, 1000)).save(flat)  # a few kB, 1.2 million pixels
    assert f"at most {MAX_PIXELS:,}" in _error(
        client, _editor(str(flat)), "3", "", 8, 1, 0, api_name="/edit"
    )
    source = _write(tmp_path / "s.png", np.zeros((256, 256, 3), np.uint8))
    assert "paint the region" in _error(client, _editor(source), "3", "", 8, 1, 0, api_name="/edit")
    image = client.predict("1", "", 8, 5.0, 2.0, "lpd", 0, api_name="/generate")[0]
    assert _png(image).shape == (256, 256, 3)


def test_uploads_over_the_size_limit_are_refused(url, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    boundary = "lpdboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + big.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{url}/gradio_api/upload",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 413


@pytest.mark.parametrize("path", ["/etc/passwd", __file__, "../../../../etc/passwd", "README.md"])
def test_no_file_outside_its_folder_is_served(url, path):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}/gradio_api/file={urllib.parse.quote(path)}", timeout=60)
    assert info.value.code in (403, 404)


def test_twenty_requests_at_once_all_complete(client):
    jobs = [
        client.submit(str(k % 10), "", 8, 5.0, 2.0, "lpd", k, api_name="/generate")
        for k in range(20)
    ]
    seeds = []
    for job in jobs:
        image, _, files, status = job.result(
            timeout=600
        )  # a bound against hanging, not a speed check
        assert _png(image).shape == (256, 256, 3) and "done" in status
        seeds.append(
            json.loads(
                open(next(f for f in files if f.endswith(".json")), encoding="utf-8").read()
            )["seed"]
        )
    assert sorted(seeds) == list(range(20))  # nothing lost, nothing answered twice


def _page(b, url: str):
    page = b.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


def test_browser_generate_edit_and_a_bad_input(url):
    with browser() as b:
        page = _page(b, url)
        page.click("#generate-btn")
        page.locator("#gen-status", has_text="done").wait_for()
        src = page.locator("#gen-image img").get_attribute("src")
        pixels = np.asarray(
            Image.open(io.BytesIO(page.request.get(urllib.parse.urljoin(url + "/", src)).body()))
        )
        assert pixels.shape[:2] == (256, 256) and pixels.std() > 0
        page.get_by_role("tab", name="Edit").click()
        page.click("#edit-btn")  # no image yet: a message, not a traceback
        page.get_by_text("upload an image or pick a sample first").wait_for()
        page.get_by_text("Use the generated image").click()
        paint(page)
        page.click("#edit-btn")
        page.locator("#edits img").nth(3).wait_for()  # four variants
        edits = page.locator("#edits img")
        assert edits.count() >= 4
