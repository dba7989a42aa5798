"""The token-masking report (sparse_viz/report/masking.py + masking.js), on synthetic results.

The reference for every value the page shows is the DataFrame the test builds (and pandas
group-bys over it), never the payload the code produced.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from browser import chromium, open_report  # noqa: F401  (chromium is a fixture)
from sparse_viz.errors import UserInputError
from sparse_viz.report.masking import masking_payload, render_masking_report, round_significant

COLUMNS = ["generation_step", "layer", "token_masked", "token_position", "variant", "l2_distance", "cosine_distance"]
HOSTILE_TOKEN = "</script><img src=x onerror=alert(1)>"
PROMPT_TOKENS = ["<s>", "The", " capital", "\u2028<!--", HOSTILE_TOKEN, " is"]
GENERATED = [" Paris", "."]
NUM_LAYERS, NUM_HEADS, NUM_STEPS = 4, 3, 2
VARIANTS = ["Full", "Attn"] + [f"Head_{h}" for h in range(NUM_HEADS)]
# ColorBrewer YlOrRd end points: what d3.interpolateYlOrRd gives at 0 and 1.
YLORRD_LOW, YLORRD_HIGH = "rgb(255, 255, 204)", "rgb(128, 0, 38)"


def step_tokens(step: int) -> list[str]:
    return PROMPT_TOKENS + GENERATED[:step]


def synthetic_results(seed: int = 0) -> pd.DataFrame:
    """Long-format results of NUM_STEPS steps; the (last step, Full) view has its unique
    maximum 9.0 at layer 2 / position 0 and an exact 0.0 at layer 0 / position 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(NUM_STEPS):
        for layer in range(NUM_LAYERS):
            for position, token in enumerate(step_tokens(step)):
                for variant in VARIANTS:
                    rows.append((step, layer, token, position, variant, rng.uniform(0.1, 1.0), rng.uniform(0.0, 0.5)))
    frame = pd.DataFrame(rows, columns=COLUMNS).sample(frac=1.0, random_state=seed)  # order must not matter
    last_full = (frame.generation_step == NUM_STEPS - 1) & (frame.variant == "Full")
    frame.loc[last_full & (frame.layer == 2) & (frame.token_position == 0), "l2_distance"] = 9.0
    frame.loc[last_full & (frame.layer == 0) & (frame.token_position == 1), "l2_distance"] = 0.0
    # Cosine distance is undefined when a contribution is zero: NaN must show as "no value".
    frame.loc[last_full & (frame.layer == 3) & (frame.token_position == 2), "cosine_distance"] = np.nan
    return frame


def synthetic_metadata() -> dict:
    return {
        "model": f"tiny-llama {HOSTILE_TOKEN}",
        "prompt": "The capital " + HOSTILE_TOKEN + " is",
        "tokens": step_tokens(NUM_STEPS - 1),
        "generated_text": "".join(GENERATED) + " <b>bold</b>",
        "num_layers": NUM_LAYERS,
        "num_heads": NUM_HEADS,
        "variant_definitions": {"Full": "layer output - layer input", "Attn": "after o_proj <i>x</i>"},
        "steps": [{"generation_step": g, "tokens": step_tokens(g)} for g in range(NUM_STEPS)],
        "seconds": 1.25,
    }


def value(frame: pd.DataFrame, step: int, variant: str, layer: int, position: int, metric: str = "l2_distance") -> float:
    hit = frame[(frame.generation_step == step) & (frame.variant == variant) & (frame.layer == layer)
                & (frame.token_position == position)]
    assert len(hit) == 1
    return float(hit[metric].iloc[0])


def visible(token: str) -> str:
    """SV.tokenLabel: whitespace made visible, nothing else changed."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u00b7")


# ----- payload (no browser) ---------------------------------------------------------------------


def test_payload_decodes_back_to_the_input_rows():
    frame = synthetic_results()
    payload = masking_payload(frame, synthetic_metadata())
    rows = payload["rows"]
    decoded = pd.DataFrame({
        "generation_step": [payload["steps"][c]["step"] for c in rows["step"]],
        "layer": [payload["layers"][c] for c in rows["layer"]],
        "token_position": rows["position"],
        "variant": [payload["variants"][c] for c in rows["variant"]],
        "l2_distance": rows["l2"],
        "cosine_distance": rows["cosine"],
    })
    key = ["generation_step", "layer", "token_position", "variant"]
    merged = frame.merge(decoded, on=key, how="outer", suffixes=("", "_decoded"), indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(frame)
    for metric in ("l2_distance", "cosine_distance"):
        np.testing.assert_allclose(merged[f"{metric}_decoded"], merged[metric], rtol=5e-5, atol=0)  # 5 significant digits
    # Token text: once per step and position, equal to the input's token_masked.
    for entry in payload["steps"]:
        at_step = frame[frame.generation_step == entry["step"]].drop_duplicates("token_position").sort_values("token_position")
        assert entry["positions"] == at_step.token_position.tolist()
        assert entry["masked"] == at_step.token_masked.tolist()
        assert entry["sequence"] == step_tokens(entry["step"])


def test_variants_are_ordered_full_attn_then_heads_numerically():
    frame = synthetic_results()
    frame.loc[frame.variant == "Head_1", "variant"] = "Head_10"
    assert masking_payload(frame, {})["variants"] == ["Full", "Attn", "Head_0", "Head_2", "Head_10"]


def test_round_significant_keeps_five_digits_and_nulls_non_finite():
    values = np.array([0.123456789, 123456.7, 1.2345678e-7, -2.0, 0.0, np.nan, np.inf])
    assert round_significant(values) == [0.12346, 123460.0, 1.2346e-07, -2.0, 0.0, None, None]


def test_missing_optional_metadata_is_accepted():
    payload = masking_payload(synthetic_results(), {})
    assert payload["meta"]["num_layers"] == NUM_LAYERS and payload["meta"]["num_heads"] == NUM_HEADS
    assert all(entry["sequence"] is None for entry in payload["steps"])


def test_metadata_from_the_analysis_is_shown_where_it_belongs():
    metadata = {
        **synthetic_metadata(),
        "steps": [{"generation_step": g, "tokens": step_tokens(g), "next_token": GENERATED[g]} for g in range(NUM_STEPS)],
        "distance_definitions": {"l2_distance": "||a - b||", "cosine_distance": "1 - cos(a, b)"},
        "timings": {"total_seconds": 3.5, "step_seconds": [1.0, 2.5]},
        "num_kv_heads": np.int64(2),
        "layers": [0, 1, 2, 3],
    }
    payload = masking_payload(synthetic_results(), metadata)
    assert [s["next_token"] for s in payload["steps"]] == GENERATED
    assert payload["definitions"]["metrics"]["l2_distance"] == "||a - b||"
    assert "Masking" in payload["definitions"]["metrics"]
    assert payload["meta"]["extra"] == {"seconds": 1.25, "timings.total_seconds": 3.5, "num_kv_heads": 2}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns=["variant", "cosine_distance"]), "variant, cosine_distance"),
        (lambda f: f.iloc[:0], "empty"),
    ],
)
def test_bad_results_are_one_clear_error_and_nothing_is_written(tmp_path, change, message):
    with pytest.raises(UserInputError, match=message):
        render_masking_report(tmp_path / "out", change(synthetic_results()), {})
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserInputError, match="cannot write the masking report to .*a_file"):
        render_masking_report(blocker / "out", synthetic_results(), {})
    assert blocker.read_text() == "not a folder"


def test_untrusted_text_never_appears_as_markup_in_the_file(tmp_path):
    path = render_masking_report(tmp_path, synthetic_results(), synthetic_metadata())
    text = path.read_text(encoding="utf-8")
    assert "<img" not in text and "<b>bold" not in text and "<i>x" not in text
    scripts = re.findall(r"<script[^>]*>", text)
    assert scripts[0] == '<script type="application/json" id="report-data">'
    # The one payload element parses back to the hostile strings, intact.
    body = text.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(body)["steps"][0]["masked"][4] == HOSTILE_TOKEN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# ----- in Chromium --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    frame = synthetic_results()
    return frame, render_masking_report(tmp_path_factory.mktemp("masking"), frame, synthetic_metadata())


def cell(page, position: int, layer: int):
    return page.locator(f'table.heatmap tbody tr[data-position="{position}"] td[data-layer="{layer}"]')


@pytest.mark.browser
def test_report_loads_cleanly_and_saves_a_screenshot(chromium, report_path):  # noqa: F811
    frame, path = report_path
    with open_report(chromium, path) as report:
        page = report.page
        shot = report.screenshot("masking_report")
        assert shot.is_file() and shot.stat().st_size > 10_000
        # Default view: last step, Full, L2; one row per analysed position, one cell per layer.
        assert page.locator("table.heatmap").get_attribute("data-variant") == "Full"
        assert page.locator("table.heatmap tbody tr").count() == len(step_tokens(NUM_STEPS - 1))
        assert page.locator("table.heatmap tbody td").count() == len(step_tokens(NUM_STEPS - 1)) * NUM_LAYERS
        assert page.locator("table.heatmap thead th").count() == NUM_LAYERS + 1
        assert page.locator("#d3-source").text_content().startswith("D3 v7")


@pytest.mark.browser
def test_cells_show_the_value_and_colour_of_their_row(chromium, report_path):  # noqa: F811
    frame, path = report_path
    last = NUM_STEPS - 1
    with open_report(chromium, path) as report:
        page = report.page
        for layer, position in [(1, 3), (3, 5), (0, 6)]:
            shown = float(cell(page, position, layer).get_attribute("data-value"))
            assert shown == pytest.approx(value(frame, last, "Full", layer, position), rel=1e-4)
        # The maximum of the view gets the top of the colour scale, an exact zero the bottom.
        assert cell(page, 0, 2).evaluate("e => getComputedStyle(e).backgroundColor") == YLORRD_HIGH
        assert cell(page, 1, 0).evaluate("e => getComputedStyle(e).backgroundColor") == YLORRD_LOW
        assert "9.000 at layer 2 when masking token 0" in page.locator("#view-summary").text_content()


@pytest.mark.browser
def test_colour_cap_saturates_the_cells_above_the_percentile(chromium, report_path):  # noqa: F811
    frame, path = report_path
    view = frame[(frame.generation_step == NUM_STEPS - 1) & (frame.variant == "Full")]
    cap = np.quantile(view.l2_distance.to_numpy(), 0.95)  # same definition as d3.quantileSorted
    with open_report(chromium, path) as report:
        page = report.page
        page.select_option("#cap-select", "p95")
        cells = page.locator("table.heatmap tbody td").evaluate_all(
            "tds => tds.map(td => [Number(td.dataset.value), getComputedStyle(td).backgroundColor])")
        assert len(cells) == len(view)
        for shown, colour in cells:
            assert (colour == YLORRD_HIGH) == (shown >= cap * (1 - 1e-4)), (shown, cap, colour)
        assert sum(colour == YLORRD_HIGH for _, colour in cells) >= 2


@pytest.mark.browser
def test_sink_position_can_be_left_out_of_the_colour_scale(chromium, report_path):  # noqa: F811
    """Position 0 holds the view's maximum (9.0, an attention sink's pattern): the page says so,
    names --exclude-first-token, and its toggle rescales the colours to the other positions'
    maximum, position 0's cells saturating."""
    frame, path = report_path
    view = frame[(frame.generation_step == NUM_STEPS - 1) & (frame.variant == "Full")]
    rest = view[view.token_position > 0]
    with open_report(chromium, path) as report:
        page = report.page
        legend = page.locator("#legend svg.color-legend")
        assert float(legend.get_attribute("data-max")) == pytest.approx(view.l2_distance.max(), rel=1e-4)
        note = page.locator("#sink-note")
        assert note.is_visible() and "--exclude-first-token" in note.text_content()
        page.locator("#exclude-first").check()
        assert float(legend.get_attribute("data-max")) == pytest.approx(rest.l2_distance.max(), rel=1e-4)
        top = rest.loc[rest.l2_distance.idxmax()]
        assert cell(page, int(top.token_position), int(top.layer)).evaluate(
            "e => getComputedStyle(e).backgroundColor") == YLORRD_HIGH
        above = view[(view.token_position == 0) & (view.l2_distance > rest.l2_distance.max())]
        assert len(above) >= 1
        for _, row in above.iterrows():
            target = cell(page, 0, int(row.layer))
            assert target.evaluate("e => getComputedStyle(e).backgroundColor") == YLORRD_HIGH
            assert "saturated" in target.get_attribute("class")
        report.screenshot("masking_report_sink_excluded")
        page.locator("#exclude-first").uncheck()
        assert float(legend.get_attribute("data-max")) == pytest.approx(view.l2_distance.max(), rel=1e-4)
        assert page.locator("table.heatmap td.saturated").count() == 0


@pytest.mark.browser
def test_metric_toggle_switches_to_cosine_distance(chromium, report_path):  # noqa: F811
    frame, path = report_path
    last = NUM_STEPS - 1
    with open_report(chromium, path) as report:
        page = report.page
        page.locator("input[name=metric][value=cosine]").check(force=True)
        shown = float(cell(page, 4, 1).get_attribute("data-value"))
        assert shown == pytest.approx(value(frame, last, "Full", 1, 4, "cosine_distance"), rel=1e-4)
        assert "Cosine distance" in page.locator("#view-summary").text_content()
        undefined = cell(page, 2, 3)
        assert undefined.get_attribute("data-value") == "" and "missing" in undefined.get_attribute("class")
        undefined.hover()
        assert "Cosine distance: n/a" in page.locator(".tooltip").text_content()
        assert "Cosine distance" in page.locator("#legend").text_content()


@pytest.mark.browser
def test_step_filter_shows_that_steps_tokens_and_values(chromium, report_path):  # noqa: F811
    frame, path = report_path
    with open_report(chromium, path) as report:
        page = report.page
        page.select_option("#step-select", label=f"Step 0 ({len(step_tokens(0))} tokens)")
        assert page.locator("table.heatmap tbody tr").count() == len(step_tokens(0))
        shown = float(cell(page, 2, 3).get_attribute("data-value"))
        assert shown == pytest.approx(value(frame, 0, "Full", 3, 2), rel=1e-4)
        assert page.locator("#sequence span.token").count() == len(step_tokens(0))


@pytest.mark.browser
def test_variant_select_shows_one_head_or_all_heads_as_small_multiples(chromium, report_path):  # noqa: F811
    frame, path = report_path
    last = NUM_STEPS - 1
    with open_report(chromium, path) as report:
        page = report.page
        page.select_option("#variant-select", label="Head 2")
        assert page.locator("table.heatmap").get_attribute("data-variant") == "Head_2"
        shown = float(cell(page, 5, 1).get_attribute("data-value"))
        assert shown == pytest.approx(value(frame, last, "Head_2", 1, 5), rel=1e-4)

        page.select_option("#variant-select", label=f"All heads ({NUM_HEADS} small multiples)")
        assert page.locator("table.heatmap").count() == 0
        figures = page.locator("#multiples figure")
        assert [figures.nth(i).get_attribute("data-variant") for i in range(NUM_HEADS)] == [f"Head_{h}" for h in range(NUM_HEADS)]
        for h in range(NUM_HEADS):
            head_max = frame[(frame.generation_step == last) & (frame.variant == f"Head_{h}")].l2_distance.max()
            assert float(figures.nth(h).locator("canvas").get_attribute("data-max")) == pytest.approx(head_max, rel=1e-4)


@pytest.mark.browser
def test_bars_sum_or_max_each_tokens_impact_over_layers(chromium, report_path):  # noqa: F811
    frame, path = report_path
    view = frame[(frame.generation_step == NUM_STEPS - 1) & (frame.variant == "Attn")]
    with open_report(chromium, path) as report:
        page = report.page
        page.select_option("#variant-select", label="Attn")
        for aggregate in ("sum", "max"):
            page.select_option("#agg-select", aggregate)
            expected = view.groupby("token_position").l2_distance.agg(aggregate)
            bars = page.locator("#bars g.row")
            shown = {int(bars.nth(i).get_attribute("data-position")): float(bars.nth(i).get_attribute("data-value"))
                     for i in range(bars.count())}
            assert shown.keys() == set(expected.index)
            for position, total in expected.items():
                assert shown[position] == pytest.approx(total, rel=1e-4)
        page.select_option("#order-select", "impact")
        first = int(page.locator("#bars g.row").first.get_attribute("data-position"))
        assert first == int(expected.idxmax())


@pytest.mark.browser
def test_hostile_token_text_is_shown_as_text_and_runs_nothing(chromium, report_path):  # noqa: F811
    frame, path = report_path
    with open_report(chromium, path) as report:  # on exit: no dialog, no console/page error
        page = report.page
        assert page.locator("img, b, i").count() == 0
        row_tokens = page.locator("table.heatmap tbody th .tok").all_text_contents()
        assert row_tokens[4] == visible(HOSTILE_TOKEN)
        assert row_tokens[3] == visible("\u2028<!--")
        assert page.locator("#prompt-text").text_content() == "The capital " + HOSTILE_TOKEN + " is"
        assert page.locator("#generated-text").text_content() == " Paris. <b>bold</b>"
        assert HOSTILE_TOKEN in page.locator("h1").text_content()
        cell(page, 4, 1).hover()
        assert visible(HOSTILE_TOKEN) in page.locator(".tooltip").text_content()
        page.select_option("#variant-select", label=f"All heads ({NUM_HEADS} small multiples)")
        assert page.locator("img").count() == 0
    assert report.dialogs == []


@pytest.mark.browser
def test_report_without_optional_metadata_loads(chromium, tmp_path):  # noqa: F811
    frame = synthetic_results()
    path = render_masking_report(tmp_path, frame, {})
    with open_report(chromium, path) as report:
        page = report.page
        assert page.locator("table.heatmap tbody tr").count() == len(step_tokens(NUM_STEPS - 1))
        assert page.locator("#prompt-text").text_content() == "(not recorded)"
        assert "Full" in page.locator("#variant-definitions").text_content()


@pytest.mark.browser
def test_report_of_a_subset_of_layers_and_positions(chromium, tmp_path):  # noqa: F811
    frame = synthetic_results()
    subset = frame[frame.layer.isin([0, 3]) & frame.token_position.isin([0, 2, 5])]
    path = render_masking_report(tmp_path, subset, synthetic_metadata())
    last = NUM_STEPS - 1
    with open_report(chromium, path) as report:
        page = report.page
        assert page.locator("table.heatmap thead th.layer").all_text_contents() == ["0", "3"]
        assert [int(x) for x in page.locator("table.heatmap tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.position)")] == [0, 2, 5]
        shown = float(cell(page, 5, 3).get_attribute("data-value"))
        assert shown == pytest.approx(value(frame, last, "Full", 3, 5), rel=1e-4)
        # The whole sequence is shown; tokens that were not masked are marked as such.
        tokens = page.locator("#sequence span.token")
        assert tokens.count() == len(step_tokens(last))
        unanalysed = page.locator("#sequence span.token.unanalysed").evaluate_all("s => s.map(e => +e.dataset.position)")
        assert unanalysed == [p for p in range(len(step_tokens(last))) if p not in (0, 2, 5)]


@pytest.mark.browser
def test_headers_stay_visible_when_the_heatmap_scrolls(chromium, tmp_path):  # noqa: F811
    layers, positions = 60, 80
    frame = pd.DataFrame({
        "generation_step": 0,
        "layer": np.repeat(np.arange(layers), positions),
        "token_masked": [f"t{p}" for p in range(positions)] * layers,
        "token_position": np.tile(np.arange(positions), layers),
        "variant": "Full",
        "l2_distance": 1.0,
        "cosine_distance": 0.5,
    })
    path = render_masking_report(tmp_path, frame, {})
    with open_report(chromium, path, viewport=(700, 700)) as report:
        page = report.page
        scroller = page.locator("#heatmap")
        scroller.evaluate("e => { e.scrollTop = 400; e.scrollLeft = 300; }")
        box = scroller.bounding_box()
        header = page.locator("table.heatmap thead th.layer").first.bounding_box()
        row_head = page.locator("table.heatmap tbody th.row-head").nth(40).bounding_box()
        assert abs(header["y"] - box["y"]) <= 2, "the layer header row scrolled away"
        assert abs(row_head["x"] - box["x"]) <= 2, "the token column scrolled away"
        # ...while the cells under them did move.
        assert page.locator('table.heatmap tbody tr[data-position="0"]').bounding_box()["y"] < box["y"]
