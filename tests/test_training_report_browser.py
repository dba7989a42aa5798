"""The training report in headless Chromium: loads cleanly, the controls change what is shown,
and an untrusted token string renders as text and runs nothing."""

from __future__ import annotations

import pytest
from browser import chromium, open_report  # noqa: F401  (chromium is a fixture)
from test_tracking_analyse import XSS_TOKEN, write_synthetic_run

from sparse_viz.report.training import render_training_report

TOKENS = ["Hello", " world", ",", "\n", XSS_TOKEN, " 42", " The", " and"]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    run = write_synthetic_run(tmp_path_factory.mktemp("run") / "browser-run", n_snapshots=4, tokens=TOKENS)
    return render_training_report(run)


@pytest.mark.browser
def test_report_loads_and_the_controls_change_what_is_shown(chromium, report_path):  # noqa: F811
    with open_report(chromium, report_path) as report:
        page = report.page
        tokens = page.locator("#tokens .token")
        assert tokens.count() == 24
        # the initial query is highlighted with its selected keys
        assert page.locator("#tokens .token.query").count() == 1
        assert page.locator("#tokens .token.selected-key").count() > 0

        # hovering another token makes it the query: the info line and the highlighted keys change
        before_info = page.locator("#query-info").text_content()
        tokens.nth(20).hover()
        after_info = page.locator("#query-info").text_content()
        assert after_info != before_info and "query t = 20" in after_info
        selected_20 = page.eval_on_selector_all("#tokens .token.selected-key", "els => els.map(e => e.dataset.t)")
        assert 1 <= len(selected_20) <= 6 and all(int(t) <= 20 for t in selected_20)

        # moving the step slider changes the label, the heatmap pixels and the selection shown
        def heatmap_pixels():
            return page.evaluate("() => Array.from(document.getElementById('heatmap').getContext('2d')"
                                 ".getImageData(0, 0, 480, 480).data.filter((_, i) => i % 97 === 0)).join(',')")

        label_last, pixels_last = page.locator("#step-label").text_content(), heatmap_pixels()
        shades_last = page.eval_on_selector_all("#tokens .token", "els => els.map(e => e.style.background).join('|')")
        page.locator("#step-slider").fill("0")
        assert page.locator("#step-label").text_content() != label_last
        assert "step 0" in page.locator("#step-label").text_content()
        assert heatmap_pixels() != pixels_last
        shades_first = page.eval_on_selector_all("#tokens .token", "els => els.map(e => e.style.background).join('|')")
        assert shades_first != shades_last

        # the layer select rebuilds the per-layer charts; the charts have points with tooltips
        page.select_option("#layer-select", "1")
        assert page.locator("#charts svg circle").count() > 10
        loss_chart = page.locator("#charts .tr-chart").filter(has_text="validation loss")
        loss_chart.locator("circle").nth(1).hover()
        assert page.locator(".tooltip").is_visible()
        assert "val loss · step 10" in page.locator(".tooltip").text_content()
        assert page.locator("#definitions dt").count() >= 10
        report.screenshot("training_report")


@pytest.mark.browser
def test_an_untrusted_token_renders_as_text_and_runs_nothing(chromium, report_path):  # noqa: F811
    html = report_path.read_text(encoding="utf-8")
    assert "<img src=x" not in html  # escaped inside the JSON payload
    with open_report(chromium, report_path) as report:
        page = report.page
        texts = page.eval_on_selector_all("#tokens .token", "els => els.map(e => e.textContent)")
        assert texts[4] == "</script><img\u00b7src=x\u00b7onerror=alert(1)>"  # tokenLabel shows spaces as ·
        assert page.locator("img").count() == 0
        page.locator("#tokens .token").nth(4).hover()
        page.locator("#tokens .token").nth(4).click()
        assert report.dialogs == []
    # leaving the block asserted: no console error, no page error, no dialog, no network request


@pytest.mark.browser
def test_charts_and_heatmap_explain_themselves(chromium, report_path):  # noqa: F811
    """Every evolution chart names its x axis; a chart of several series has a legend, and no
    legend entry lies on the plotting area; the selection heatmap has a colour scale whose top
    colour is the colour the heatmap paints a row's highest-scored key with."""
    with open_report(chromium, report_path) as report:
        page = report.page
        charts = page.locator("#charts .tr-chart")
        with_data = [i for i in range(charts.count()) if charts.nth(i).locator("svg").count()]
        assert len(with_data) >= 6
        for i in with_data:
            chart = charts.nth(i)
            assert chart.locator("svg text.x-label").text_content() == "training step"
            area = chart.locator("svg rect.plot-area").bounding_box()
            for j in range(chart.locator(".legend-item").count()):
                box = chart.locator(".legend-item").nth(j).bounding_box()
                overlaps = (box["x"] < area["x"] + area["width"] and area["x"] < box["x"] + box["width"]
                            and box["y"] < area["y"] + area["height"] and area["y"] < box["y"] + box["height"])
                assert not overlaps, (chart.locator("h3").text_content(), j)
        entropy = charts.filter(has_text="attention entropy")
        assert entropy.locator(".legend-item").all_text_contents() == ["used", "dense"]
        mass = charts.filter(has_text="mass@k: indexer vs baselines")
        assert mass.locator(".legend-item").all_text_contents()[0] == "indexer"

        legend = page.locator("#heatmap-scale svg.color-legend")
        assert (legend.get_attribute("data-min"), legend.get_attribute("data-max")) == ("0", "1")
        assert "indexer score" in legend.get_attribute("data-title")
        top = page.evaluate("() => { const stops = document.querySelectorAll('#heatmap-scale stop');"
                            " return stops[stops.length - 1].getAttribute('stop-color'); }")
        painted = page.evaluate("""() => { const c = document.getElementById('heatmap');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const seen = new Set();
            for (let i = 0; i < d.length; i += 4) seen.add(`rgb(${d[i]}, ${d[i + 1]}, ${d[i + 2]})`); return [...seen]; }""")
        assert top in painted
        page.select_option("#shade-select", "dense")
        assert "probability" in page.locator("#heatmap-scale svg.color-legend").get_attribute("data-title")
        report.screenshot("training_report_scales")


@pytest.mark.browser
def test_a_chart_with_nothing_recorded_says_why(chromium, tmp_path):  # noqa: F811
    """A run without validation losses or indexer KL (e.g. a baseline selector, killed before its
    first validation): those charts carry a sentence saying why, the others still draw."""
    import json

    run = write_synthetic_run(tmp_path / "run", n_snapshots=3, tokens=TOKENS)
    history = run / "analysis" / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    records = [{k: v for k, v in r.items() if "val_loss" not in k and "indexer_kl" not in k} for r in records]
    history.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open_report(chromium, render_training_report(run)) as report:
        page = report.page
        charts = page.locator("#charts .tr-chart")
        loss = charts.filter(has_text="validation loss")
        assert loss.locator("svg").count() == 0
        assert "no validation has run yet" in loss.locator(".not-recorded").text_content()
        kl = charts.filter(has_text="KL(p")
        assert "no Lightning Indexer" in kl.locator(".not-recorded").text_content()
        assert page.locator("#charts .not-recorded").count() == 2
        report.screenshot("training_report_not_recorded")


@pytest.mark.browser
def test_a_run_without_key_selection_says_so_instead_of_an_empty_matrix(chromium, tmp_path):  # noqa: F811
    """The dense baseline stores no selection (every slot padded): the selection matrix says why
    it has no colour, and shows no colour scale for it."""
    import numpy as np

    from sparse_viz.tracking.store import RunStore

    run = write_synthetic_run(tmp_path / "run", n_snapshots=2, tokens=TOKENS)
    store = RunStore(run)
    for step in store.steps():
        arrays = dict(store.load_snapshot(step))
        arrays["show_selected"] = np.full_like(arrays["show_selected"], -1)
        np.savez_compressed(store.snapshot_path(step), **arrays)
    with open_report(chromium, render_training_report(run)) as report:
        page = report.page
        note = page.locator("#heatmap-note")
        assert note.is_visible() and "No key selection recorded" in note.text_content()
        assert page.locator("#heatmap-scale svg").count() == 0
