"""Screenshots of the web app's three tabs (the embedded model) into docs/: serves
``python -m lpd.app`` on a free local port and drives the system Chromium headless.

    python scripts/app_screenshots.py [--output_dir docs]
"""

from __future__ import annotations

import argparse
import os

from lpd.app.harness import browser, paint, serve

WAIT_MS = 180_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="docs")
    args = p.parse_args()
    shots = {
        tab: os.path.join(args.output_dir, f"app_{tab.lower()}.png")
        for tab in ("Generate", "Edit", "Orders")
    }
    with serve() as url, browser() as b:
        page = b.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.click("#generate-btn")
        page.locator("#gen-status", has_text="done").wait_for()
        page.screenshot(path=shots["Generate"])
        page.get_by_role("tab", name="Edit").click()
        page.locator("#editor").wait_for()
        page.locator(".gallery-item, button.example").nth(0).click()  # the held-out 0, class 0
        paint(page, dy=40)
        page.click("#edit-btn")
        page.locator("#edits img").nth(3).wait_for()
        page.locator("#masked img").wait_for()
        page.screenshot(path=shots["Edit"], full_page=True)
        page.get_by_role("tab", name="Orders").click()
        page.click("#orders-btn")
        page.get_by_text("context support").wait_for()
        page.screenshot(path=shots["Orders"], full_page=True)
    print("wrote " + ", ".join(shots.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
