"""The shared report layer (sparse_viz/report/html.py): safe JSON embedding, D3 source, atomic writes."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from browser import chromium, open_report  # noqa: F401  (chromium is a fixture)
from sparse_viz.report import html

HOSTILE = {
    "close": "</script><script>alert('closed')</script>",
    "comment": "<!-- <script>alert('comment')</script>",
    "img": "<img src=x onerror=alert(1)>",
    "separators": "line\u2028separator\u2029paragraph",
    "amp": "&lt; is not <",
    "unicode": "naïve ▁token 日本",
    "quote": "\"'`\\",
}


@pytest.fixture
def fresh_d3_source(monkeypatch):
    """d3_source() is cached: clear it around a test that changes where D3 comes from."""
    html.d3_source.cache_clear()
    yield monkeypatch
    html.d3_source.cache_clear()


# ----- json_for_script --------------------------------------------------------------------------


def test_json_for_script_escapes_what_could_end_the_script_element():
    assert html.json_for_script({"a": "</script>"}) == '{"a":"\\u003c/script\\u003e"}'
    text = html.json_for_script(HOSTILE)
    assert "<" not in text and ">" not in text and "&" not in text
    assert "</script" not in text.lower() and "<!--" not in text
    assert "\u2028" not in text and "\u2029" not in text
    assert "\\u2028" in text and "\\u2029" in text


def test_json_for_script_round_trips_through_a_json_parser():
    assert json.loads(html.json_for_script(HOSTILE)) == HOSTILE


def test_json_for_script_turns_nan_and_infinity_into_null():
    data = {"x": [1.5, float("nan"), float("inf"), -float("inf")], "nested": {"y": float("nan")}}
    assert json.loads(html.json_for_script(data)) == {"x": [1.5, None, None, None], "nested": {"y": None}}
    assert "NaN" not in html.json_for_script(data) and "Infinity" not in html.json_for_script(data)


@pytest.mark.browser
def test_payload_parses_back_to_the_same_data_in_chromium(chromium, tmp_path):  # noqa: F811
    payload = {**HOSTILE, "numbers": [0.1, 1e-300, None, float("nan")], "list": ["</SCRIPT >", "<!--"]}
    path = html.render_report("base.html.j2", tmp_path / "report.html", title="</title><b>t</b>", data=payload)
    with open_report(chromium, path, wait_ready=False) as report:
        parsed = report.page.evaluate("() => SV.data")
        assert parsed == {**payload, "numbers": [0.1, 1e-300, None, None]}
        # Nothing the payload or title carries became an element or ran.
        assert report.page.locator("img, b").count() == 0
        assert report.page.title() == "</title><b>t</b>"
        assert report.page.locator("h1").text_content() == "</title><b>t</b>"
    assert report.dialogs == []


# ----- D3: inlined local copy or CDN with SRI -------------------------------------------------------


def test_d3_is_inlined_when_the_local_copy_matches_its_sha256(fresh_d3_source, tmp_path):
    code = b"/* fake d3 */ window.d3 = {version: 'test'};"
    local = tmp_path / "d3.min.js"
    local.write_bytes(code)
    fresh_d3_source.setattr(html, "D3_LOCAL_PATH", local)
    fresh_d3_source.setattr(html, "D3_SHA256", hashlib.sha256(code).hexdigest())
    source = html.d3_source()
    assert source.inlined
    assert source.tag == f"<script>{code.decode()}</script>"
    assert "inlined" in source.description and "sha256" in source.description


@pytest.mark.parametrize("case", ["missing", "tampered", "contains_closing_tag"])
def test_d3_comes_from_the_cdn_with_sri_when_the_local_copy_is_unusable(fresh_d3_source, tmp_path, case):
    local = tmp_path / "d3.min.js"
    if case == "tampered":
        local.write_bytes(b"window.d3 = {}; /* not the pinned file */")
    elif case == "contains_closing_tag":
        local.write_bytes(b"var s = '</script>';")
        fresh_d3_source.setattr(html, "D3_SHA256", hashlib.sha256(local.read_bytes()).hexdigest())
    fresh_d3_source.setattr(html, "D3_LOCAL_PATH", local)
    source = html.d3_source()
    assert not source.inlined
    assert source.tag == (
        f'<script src="https://cdn.jsdelivr.net/npm/d3@{html.D3_VERSION}/dist/d3.min.js" '
        f'integrity="{html.D3_CDN_SRI}" crossorigin="anonymous"></script>'
    )
    assert "cdn.jsdelivr.net" in source.description
    page = html.render_html("base.html.j2", title="t", data={})
    assert source.tag in page and "<script>/*" not in page
    assert "cdn.jsdelivr.net" in page.split('id="d3-source">', 1)[1].split("<", 1)[0]


def test_cdn_sri_hash_is_the_sha384_of_the_pinned_d3_file():
    if not html.D3_LOCAL_PATH.is_file():  # the browser tests fail loudly then (D3 from the CDN is blocked)
        pytest.skip("no local D3 copy to hash (scripts/setup.sh installs it with npm)")
    code = html.D3_LOCAL_PATH.read_bytes()
    assert hashlib.sha256(code).hexdigest() == html.D3_SHA256
    assert html.D3_CDN_SRI == "sha384-" + base64.b64encode(hashlib.sha384(code).digest()).decode()


# ----- atomic writes ---------------------------------------------------------------------------


def test_write_text_atomic_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "report.html"
    html.write_text_atomic(target, "first")
    html.write_text_atomic(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old", encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(html.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        html.write_text_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.browser
def test_browser_helper_blocks_the_cdn_and_says_why(chromium, fresh_d3_source, tmp_path):  # noqa: F811
    fresh_d3_source.setattr(html, "D3_LOCAL_PATH", tmp_path / "missing.js")
    path = html.render_report("base.html.j2", tmp_path / "report.html", title="t", data={})
    with open_report(chromium, path, wait_ready=False, check_clean=False) as report:
        assert report.page.evaluate("() => typeof d3") == "undefined"
    assert report.external_requests == [html.D3_CDN_URL]
    assert any("scripts/setup.sh" in problem for problem in report.problems())
    with pytest.raises(AssertionError, match="external request"):
        report.assert_clean()
