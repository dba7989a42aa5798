"""Headless Chromium (Playwright) helpers shared by the report-load benches (imported as a
sibling: `python bench/bench_x.py` puts bench/ on sys.path)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
READY = "() => document.body.dataset.ready === '1'"


def require_chromium(script: str) -> None:
    """Exit with a one-line message when Chromium is missing."""
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{script}: {CHROMIUM} not found (apt-get install chromium)")


def launch(playwright):
    """The system Chromium, headless."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def open_ready(browser, path: Path):
    """Open `path` in a new page and wait until the page sets body[data-ready="1"]."""
    page = browser.new_page()
    page.goto(path.as_uri())
    page.wait_for_function(READY, timeout=60_000, polling=5)
    return page


def load_report(browser, path: Path, init_script: str | None = None):
    """Load a report in a new 1400x1000 page and wait for its ready mark.

    Args:
        browser: from `launch`.
        path: the report's HTML file.
        init_script: run in the page before its own scripts (e.g. a paint marker).

    Returns:
        (page, errors, wall_ms, ready_ms): the open page; its uncaught errors (the list keeps
        filling while the page is open); navigation -> ready in wall time, Playwright round trips
        included; and the page's own `sv-ready` performance mark.
    """
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    if init_script is not None:
        page.add_init_script(init_script)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    start = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_function(READY, timeout=60_000, polling=5)
    wall_ms = (time.perf_counter() - start) * 1000
    ready_ms = page.evaluate("() => performance.getEntriesByName('sv-ready')[0].startTime")
    return page, errors, wall_ms, ready_ms
