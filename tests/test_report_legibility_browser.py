"""Reports stay legible in headless Chromium: token text is readable on every shade it is drawn
on (WCAG 2 contrast, computed here from the colours the browser actually rendered), the training
report's legend names the query's real colour, and a chart title never lies on its bars."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from browser import chromium, open_report  # noqa: F401  (chromium is a fixture)
from test_tracking_analyse import write_synthetic_run

from sparse_viz.report.impact import impact_payload, render_impact_report
from sparse_viz.report.masking import render_masking_report
from sparse_viz.report.training import render_training_report

# WCAG 2.1 level AA for normal-size text (success criterion 1.4.3): contrast ratio >= 4.5:1.
AA_NORMAL_TEXT = 4.5


def relative_luminance(rgb: tuple[float, float, float]) -> float:
    """WCAG 2.1 relative luminance of an sRGB colour given as 0-255 channels."""
    def linear(channel: float) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """(L_lighter + 0.05) / (L_darker + 0.05), from 1 (same colour) to 21 (black on white)."""
    la, lb = relative_luminance(a), relative_luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def parse_rgb(css: str) -> tuple[float, float, float]:
    """'rgb(r, g, b)' or an opaque 'rgba(r, g, b, 1)' as computed by the browser."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", css)]
    assert len(numbers) == 3 or (len(numbers) == 4 and numbers[3] == 1), css
    return tuple(numbers[:3])


def test_the_contrast_formula_matches_wcag_reference_values():
    """The formula above against values the WCAG documents give: black on white is 21:1; white
    on #777777 is 4.48:1 (the classic 'just fails AA' grey)."""
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((255, 255, 255), (119, 119, 119)) == pytest.approx(4.48, abs=0.01)


# Text colour and the colour actually behind it (the first ancestor with an opaque background).
TEXT_AND_BACKGROUND = """(elements) => elements.map((el) => {
  let node = el, background = null;
  while (node && node.nodeType === 1) {
    const bg = getComputedStyle(node).backgroundColor;
    if (!/^rgba\\(.*,\\s*0\\)$/.test(bg) && bg !== "transparent") { background = bg; break; }
    node = node.parentElement;
  }
  return { text: el.textContent, colour: getComputedStyle(el).color, background: background || "rgb(255, 255, 255)",
           classes: el.className, t: el.dataset.t ?? el.dataset.position ?? null };
})"""


def unreadable(page, selector: str) -> tuple[list[tuple], float]:
    """Elements under `selector` whose text has contrast < AA with its background, and the
    lowest background luminance seen (so a test can check that the darkest shades were there)."""
    found = page.eval_on_selector_all(selector, TEXT_AND_BACKGROUND)
    assert found, selector
    bad, darkest = [], 1.0
    for item in found:
        fg, bg = parse_rgb(item["colour"]), parse_rgb(item["background"])
        darkest = min(darkest, relative_luminance(bg))
        ratio = contrast_ratio(fg, bg)
        if ratio < AA_NORMAL_TEXT:
            bad.append((item["t"], item["text"], item["colour"], item["background"], round(ratio, 2)))
    return bad, darkest


TOKENS = ["Hello", " world", ",", "\n", " 42", " The", " and", " sea"]


@pytest.fixture(scope="module")
def training_report(tmp_path_factory):
    run = write_synthetic_run(tmp_path_factory.mktemp("run") / "legible", n_snapshots=2, tokens=TOKENS)
    return render_training_report(run)


@pytest.mark.browser
def test_selected_key_text_is_readable_on_every_shade(chromium, training_report):  # noqa: F811
    """Every query of the probe, every shading measure: each selected key's text against its
    shade has contrast >= 4.5:1. The highest-scored key of a row gets the darkest blue
    (luminance < 0.05 checked below), where dark text used to be unreadable (1.3:1)."""
    with open_report(chromium, training_report) as report:
        page = report.page
        n = page.locator("#tokens .token").count()
        darkest_seen = 1.0
        for shade in ("score", "attn", "dense"):
            page.select_option("#shade-select", shade)
            for t in range(n):
                page.locator("#tokens .token").nth(t).hover()
                bad, darkest = unreadable(page, "#tokens .token.selected-key, #tokens .token.query")
                assert not bad, (shade, t, bad)
                darkest_seen = min(darkest_seen, darkest)
        assert darkest_seen < 0.05  # the darkest shades were among those checked


@pytest.mark.browser
def test_the_legend_names_the_colour_the_query_is_drawn_in(chromium, training_report):  # noqa: F811
    """The legend says the query is yellow and shows a swatch: the query token's computed fill is
    that swatch's colour and is a yellow (hue 40-65 degrees, saturated, light), for queries that
    selected themselves (the usual case: every row t < k is dense) as for those that did not."""
    import colorsys

    def is_yellow(rgb) -> bool:
        hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
        return 40 <= hue * 360 <= 65 and saturation > 0.5 and lightness > 0.6

    with open_report(chromium, training_report) as report:
        page = report.page
        legend = page.locator(".tr-legend").first.text_content()
        assert "yellow" in legend and "the query" in legend
        itself = {True: 0, False: 0}
        fills = set()
        for t in range(page.locator("#tokens .token").count()):
            page.locator("#tokens .token").nth(t).hover()
            query = page.locator("#tokens .token.query")
            assert query.count() == 1
            fill = parse_rgb(query.evaluate("el => getComputedStyle(el).backgroundColor"))
            selected_itself = "selected-key" in (query.get_attribute("class") or "")
            assert is_yellow(fill), (t, fill, "selected itself" if selected_itself else "did not select itself")
            fills.add(fill)
            itself[selected_itself] += 1
            assert ("(itself among them)" in page.locator("#query-info").text_content()) == selected_itself
        assert itself[True] > 0  # the case that used to turn the query blue was exercised
        # and the legend's swatch shows that same colour
        swatch = parse_rgb(page.locator("#query-swatch").evaluate("el => getComputedStyle(el).backgroundColor"))
        assert fills == {swatch}


@pytest.mark.browser
def test_masking_sequence_text_is_readable_on_every_shade(chromium, tmp_path):  # noqa: F811
    """The masking report's sequence colours each token by its impact on a YlOrRd scale from 0 to
    the largest impact. Impacts i / 20 (i = 0..20) put a token at every 5% of the scale, among
    them the orange-reds near 65-70% where a lightness cut-off gave white text at 3.7-4.3:1."""
    n = 21
    rows = [(0, 0, f"t{i}", i, variant, i / (n - 1), 0.1) for i in range(n) for variant in ("Full", "Attn")]
    frame = pd.DataFrame(rows, columns=["generation_step", "layer", "token_masked", "token_position", "variant",
                                        "l2_distance", "cosine_distance"])
    path = render_masking_report(tmp_path, frame, {"tokens": [f"t{i}" for i in range(n)]})
    with open_report(chromium, path) as report:
        bad, darkest = unreadable(report.page, "#sequence .token")
        assert not bad, bad
        assert darkest < 0.05  # the darkest red (position 20) was checked


# ----------------------------------------------------------------------------- impact charts


def boxes_intersect(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"] and \
        a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]


@pytest.mark.browser
def test_impact_row_chart_titles_clear_the_tallest_bars(chromium, tmp_path):  # noqa: F811
    """Every key of the last query has the same impact and the same mass: every bar reaches the
    top of its chart, so a title drawn inside the plotting area would lie on one of them."""
    T = 12
    l2 = np.full((1, T, T), np.nan, dtype=np.float32)
    mass = np.full((1, T, T), np.nan, dtype=np.float32)
    for t in range(T):
        l2[0, t, : t + 1] = 1.0
        mass[0, t, : t + 1] = 1.0 / (t + 1)
    agreement = pd.DataFrame(columns=["layer", "selector", "k", "impact_recall_at_k", "impact_share", "spearman",
                                      "n_queries"])
    payload = impact_payload([0], [f"w{t}" for t in range(T)], l2, mass, agreement,
                             {"k": [4], "model": "synthetic", "prompt": "p", "definitions": {}})
    path = render_impact_report(tmp_path, payload)
    with open_report(chromium, path) as report:
        page = report.page
        for chart in ("#row-impact", "#row-mass"):
            label = "impact (l2)" if chart == "#row-impact" else "attention mass (sum over heads)"
            title = page.locator(f"{chart} svg > text").filter(has_text=label)
            assert title.count() == 1
            title_box = title.bounding_box()
            bars = page.locator(f"{chart} rect")
            assert bars.count() == T
            for i in range(bars.count()):
                assert not boxes_intersect(title_box, bars.nth(i).bounding_box()), (chart, i)
        report.screenshot("impact_row_chart_titles")
