"""Vision heatmaps and report: grids from hand-built rows, PNG overlays, and the page in Chromium."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from browser import chromium, open_report  # noqa: F401  (chromium is a fixture)
from test_vision_tiny_model import test_image

from sparse_viz.report.vision import (
    aggregate_layers,
    impact_grids,
    plot_heatmap_overlays,
    render_vision_report,
    vision_report_payload,
)

LAYERS = [0, 1, 2]
EVIL = "</script><img src=x onerror=alert(1)>"


def token_map() -> dict:
    # image 0: 2x3 tokens at positions 5..10 (96x64 px); image 1: 2x2 at 13..16 (64x64 px)
    return {
        "ranges": [[5, 11], [13, 17]],
        "num_image_tokens": 10,
        "token_kinds": ["text"] * 5 + ["image"] * 6 + ["special"] * 2 + ["image"] * 4 + ["text"],
        "images": [
            {"image_index": 0, "start": 5, "stop": 11, "grid_rows": 2, "grid_cols": 3, "cell_pixels": 32,
             "resized_size": [96, 64], "original_size": [96, 64]},
            {"image_index": 1, "start": 13, "stop": 17, "grid_rows": 2, "grid_cols": 2, "cell_pixels": 32,
             "resized_size": [64, 64], "original_size": [64, 64]},
        ],
    }


def l2_value(image: int, layer: int, row: int, col: int) -> float:
    return 1000 * image + 100 * layer + 10 * row + col + 1.0


def rows() -> pd.DataFrame:
    """Synthetic long-format rows with known values (cosine = l2 / 1e4)."""
    records = []
    for image in token_map()["images"]:
        for layer in LAYERS:
            for offset in range(image["stop"] - image["start"]):
                r, c = divmod(offset, image["grid_cols"])
                for variant, scale in (("Full", 1.0), ("Attn", 0.5), ("Head_0", 0.1)):
                    value = scale * l2_value(image["image_index"], layer, r, c)
                    records.append(dict(generation_step=0, layer=layer, token_masked="<|image_pad|>",
                                        token_position=image["start"] + offset, variant=variant, l2_distance=value,
                                        cosine_distance=value / 1e4, token_kind="image",
                                        image_index=image["image_index"], grid_row=r, grid_col=c))
    return pd.DataFrame.from_records(records)


def metadata() -> dict:
    return {"model": "tiny", "prompt": EVIL, "generated_text": EVIL, "distance_definitions": {},
            "vision": {"mask": "vision", "token_map": token_map(), "attention": "causal"}}


def images():
    return [test_image(96, 64), test_image(64, 64, seed=1)]


def test_grids_place_each_token_at_its_row_and_column():
    grids = impact_grids(rows(), token_map())
    assert grids["layers"] == LAYERS
    first = grids["images"][0][(0, "Full", "l2")]
    assert first.shape == (3, 2, 3)
    for layer in LAYERS:
        for r in range(2):
            for c in range(3):
                assert first[layer, r, c] == l2_value(0, layer, r, c)
    assert grids["images"][1][(0, "Attn", "cosine")][2, 1, 0] == pytest.approx(0.5 * l2_value(1, 2, 1, 0) / 1e4)
    # all layers = mean over layers, by hand: (x + (x+100) + (x+200)) / 3 = x + 100
    np.testing.assert_allclose(aggregate_layers(first), first[1])


def test_aggregate_ignores_layers_without_values():
    grid = np.array([[[1.0, np.nan]], [[3.0, np.nan]]])
    out = aggregate_layers(grid)
    assert out[0, 0] == 2.0 and np.isnan(out[0, 1])


def test_png_overlays_per_layer_and_aggregate(tmp_path):
    written = plot_heatmap_overlays(tmp_path, impact_grids(rows(), token_map()), images())
    assert sorted(p.name for p in written) == sorted(
        f"image{i}_{stem}.png" for i in (0, 1) for stem in ("layer0", "layer1", "layer2", "all_layers")
    )
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_payload_embeds_png_data_uris_and_untrusted_text_stays_data(tmp_path):
    payload = vision_report_payload(rows(), metadata(), images())
    assert payload["images"][0]["src"].startswith("data:image/png;base64,")
    assert payload["images"][0]["values"]["0"]["Full"]["l2"][2][5] == l2_value(0, 2, 1, 2)
    path = render_vision_report(tmp_path, rows(), metadata(), images())
    text = path.read_text()
    assert EVIL not in text and "<img src=x" not in text


@pytest.mark.browser
def test_overlay_renders_and_the_layer_slider_and_metric_toggle_work(chromium, tmp_path):  # noqa: F811
    path = render_vision_report(tmp_path, rows(), metadata(), images())
    with open_report(chromium, path) as report:
        page = report.page
        assert page.locator("svg[data-image='0'] rect.cell").count() == 6
        assert page.locator("svg[data-image='1'] rect.cell").count() == 4
        assert page.locator("svg image").count() == 2
        cell = page.locator("svg[data-image='0'] rect.cell").nth(5)  # row 1, col 2
        # starts on "all layers": the mean over layers
        assert page.locator("#layer-label").text_content() == "all layers (mean)"
        assert float(cell.get_attribute("data-value")) == pytest.approx(l2_value(0, 1, 1, 2))
        page.locator("#layer-slider").fill("0")
        assert page.locator("#layer-label").text_content() == "layer 0"
        assert float(cell.get_attribute("data-value")) == pytest.approx(l2_value(0, 0, 1, 2))
        page.locator("#layer-slider").fill("2")
        assert float(cell.get_attribute("data-value")) == pytest.approx(l2_value(0, 2, 1, 2))
        # image 0's colour scale spans its cells' values at this layer (a drawn scale, not words)
        legend = page.locator("svg[data-image='0']").locator("xpath=..").locator("svg.color-legend")
        expected = [l2_value(0, 2, r, c) for r in range(2) for c in range(3)]
        assert float(legend.get_attribute("data-min")) == pytest.approx(min(expected))
        assert float(legend.get_attribute("data-max")) == pytest.approx(max(expected))
        # the brightest cell of the layer is the largest value
        fills = page.locator("svg[data-image='0'] rect.cell").evaluate_all("els => els.map(e => e.getAttribute('fill'))")
        assert len(set(fills)) == 6
        page.locator("input[name=metric][value=cosine]").check()
        assert float(cell.get_attribute("data-value")) == pytest.approx(l2_value(0, 2, 1, 2) / 1e4)
        page.select_option("#variant-select", "Attn")
        assert float(cell.get_attribute("data-value")) == pytest.approx(0.5 * l2_value(0, 2, 1, 2) / 1e4)
        assert page.locator("#prompt-text").text_content() == EVIL
        assert page.locator("img").count() == 0
        report.screenshot("vision_report")
