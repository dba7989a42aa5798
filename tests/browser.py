"""Shared helpers for the browser tests of sparse_viz reports (Playwright + Debian Chromium).

Usage in a test module::

    import pytest
    from browser import chromium, open_report   # `chromium` is a module-scoped pytest fixture

    @pytest.mark.browser
    def test_report_loads(chromium, tmp_path):
        path = render_something(tmp_path)
        with open_report(chromium, path) as report:
            assert report.page.locator("h1").text_content() == "..."
            report.screenshot("something")
        # leaving the block asserts: no console error, no page error, no dialog, no network

Contract with the report's JS: a page signals that its first render is done with
`document.body.dataset.ready = "1"` (`SV.markReady()` in `static/common.js`); `open_report`
waits for it and fails early with every error collected so far if it never comes.

Chromium comes from Debian's package at /usr/bin/chromium (`playwright install` cannot
download here). Without it a browser test is skipped locally with the reason, and FAILS when
the environment variable `CI` is set: in CI browser tests never skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_PATH = Path(os.environ.get("SV_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
D3_HINT = " (no verified local D3 copy, so the report used the CDN: run scripts/setup.sh, which needs npm)"
READY_EXPRESSION = "() => document.body && document.body.dataset.ready === '1'"


def require_chromium() -> None:
    """Skip (locally) or fail (when `CI` is set) if Chromium or Playwright is unavailable."""
    problem = None
    if not CHROMIUM_PATH.is_file():
        problem = f"Chromium not found at {CHROMIUM_PATH} (apt-get install chromium, or scripts/setup.sh --dev)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the Python package playwright is not installed (pip install -e '.[dev]')"
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI: {problem}", pytrace=False)
    pytest.skip(problem)


@contextmanager
def launch_chromium() -> Iterator[object]:
    """Launch headless Chromium; yields a Playwright `Browser`, closed on exit."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM_PATH), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """One headless Chromium per test module (launching costs ~1-2 s)."""
    with launch_chromium() as browser:
        yield browser


@dataclass
class ReportPage:
    """An open report and everything the page did wrong while it was open.

    Attributes:
        page: the Playwright `Page`.
        console_errors: text of every `console.error` message (and failed resource loads).
        page_errors: uncaught exceptions thrown by the page's scripts.
        dialogs: messages of every alert/confirm/prompt the page opened (all dismissed).
        external_requests: URLs of non-file:// requests; they are blocked (tests are offline).
    """

    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return (
            [f"console error: {m}" for m in self.console_errors]
            + [f"page error: {m}" for m in self.page_errors]
            + [f"dialog opened: {m!r}" for m in self.dialogs]
            + [f"external request: {u}" + (D3_HINT if "d3" in u else "") for u in self.external_requests]
        )

    def assert_clean(self) -> None:
        """Fail with every collected problem listed, if there is any."""
        problems = self.problems()
        assert not problems, "report misbehaved in Chromium:\n  " + "\n  ".join(problems)

    def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        """Save a PNG to tests/artifacts/<name>.png (gitignored) and return its path."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "screenshot"
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS_DIR / f"{safe}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextmanager
def open_report(
    browser: object,
    path: Path,
    *,
    wait_ready: bool = True,
    timeout_ms: float = 15_000,
    check_clean: bool = True,
    viewport: tuple[int, int] = (1400, 1000),
) -> Iterator[ReportPage]:
    """Open a local report file in a fresh page and watch it for errors.

    Args:
        browser: a Playwright `Browser` (the `chromium` fixture or `launch_chromium()`).
        path: the report's HTML file.
        wait_ready: wait until the page sets `document.body.dataset.ready = "1"`.
        timeout_ms: how long to wait for that marker.
        check_clean: on leaving the block, fail if the page logged console errors, threw,
            opened a dialog or tried to reach the network. Set False to inspect those lists
            yourself (e.g. a test that expects an error).
        viewport: (width, height) in CSS pixels.

    Yields:
        A `ReportPage`; the page is closed on exit.
    """
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    report = ReportPage(page=context.new_page())
    page = report.page

    def on_console(message):
        if message.type == "error":
            report.console_errors.append(message.text)

    def on_dialog(dialog):
        report.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_route(route):
        report.external_requests.append(route.request.url)
        route.abort()

    page.on("console", on_console)
    page.on("pageerror", lambda error: report.page_errors.append(str(error)))
    page.on("dialog", on_dialog)
    context.route(re.compile(r"^(?!file:|data:|blob:|about:).*"), on_route)
    try:
        page.goto(Path(path).resolve().as_uri())
        if wait_ready:
            try:
                page.wait_for_function(READY_EXPRESSION, timeout=timeout_ms)
            except Exception as error:  # playwright's TimeoutError, or a crash of the page
                details = "\n  ".join(report.problems()) or "no errors were logged"
                raise AssertionError(
                    f"report never set document.body.dataset.ready within {timeout_ms:.0f} ms "
                    f"({type(error).__name__}):\n  {details}"
                ) from None
        yield report
        if check_clean:
            report.assert_clean()
    finally:
        context.close()
