"""Agreement of selections with impact (hand-computed cases), the `impact` command, and its report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_cli import run_analysis_cli
from browser import chromium, open_report  # noqa: F401 - `chromium` is a fixture
from tiny_models import save_tiny, tiny_qwen3

from sparse_viz.analysis.impact.agreement import impact_recall_at_k, impact_share, spearman_by_row
from sparse_viz.analysis.impact.experiment import run_impact_analysis
from sparse_viz.analysis.masking.reference import reference_all_pairs_impact
from sparse_viz.pretrained.loading import load_model

NAN = float("nan")
HOSTILE = "</script><img src=x onerror=alert(1)>"

# One query row that matters: t = 3, keys 0..3. Impact ranks keys 3 > 0 > 1 > 2.
IMPACT = torch.tensor([
    [NAN, NAN, NAN, NAN],
    [1.0, 2.0, NAN, NAN],
    [1.0, 2.0, 3.0, NAN],
    [4.0, 2.0, 1.0, 8.0],
])


def test_impact_recall_counts_the_top_k_impact_keys_kept():
    # k = 2: rows t >= 2 count. Top-2 impact: row 2 -> {2, 1}; row 3 -> {3, 0}.
    selected = torch.tensor([[0, -1], [0, 1], [0, 1], [1, 3]])
    assert impact_recall_at_k(selected, IMPACT, 2).tolist() == [0.5, 0.5]


def test_impact_share_is_the_selected_share_of_the_row_total():
    selected = torch.tensor([[0, -1], [0, 1], [0, 1], [1, 3]])
    share = impact_share(selected, IMPACT, 2)
    assert share.tolist() == pytest.approx([(1 + 2) / 6, (2 + 8) / 15])


def test_spearman_uses_average_ranks_for_ties_and_only_the_causal_keys():
    scores = torch.tensor([
        [0.0, 9.0, 9.0, 9.0],   # future entries must be ignored
        [0.0, 1.0, 9.0, 9.0],
        [1.0, 1.0, 2.0, 9.0],   # tied scores: ranks 1.5, 1.5, 3 against impact ranks 1, 2, 3
        [3.0, 2.0, 1.0, 4.0],   # the same order as impact -> 1
    ])
    rho = spearman_by_row(scores, IMPACT, 2)
    # by hand: a = (-0.5, -0.5, 1), b = (-1, 0, 1): 1.5 / sqrt(1.5 * 2)
    assert rho.tolist() == pytest.approx([1.5 / math.sqrt(3.0), 1.0])
    reversed_scores = torch.tensor([[0.0] * 4, [0.0] * 4, [3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    assert spearman_by_row(reversed_scores, IMPACT, 2).tolist() == pytest.approx([-1.0, -1.0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = tiny_qwen3()
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "qwen3")


def test_the_analysis_scores_each_selector_against_brute_force_impact(model_dir):
    """The table's numbers recomputed by hand from the brute-force impact and the selections' own
    definitions (the last k keys; the top-k of the attention mass read from the model itself)."""
    loaded = load_model(model_dir, device="cpu")
    result = run_impact_analysis("The cat sat on the mat.", model=loaded, layers=[1], k=[3])
    input_ids = loaded.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    T = input_ids.shape[1]
    with torch.no_grad():
        out = loaded.model(input_ids=input_ids, output_attentions=True, use_cache=False)
    mass = out.attentions[1][0].sum(0)  # (T, T) summed over heads, from the model's own eager attention
    from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs

    inputs, _ = capture_layer_inputs(loaded.adapter, input_ids, [1])
    impact = reference_all_pairs_impact(loaded.adapter, 1, inputs[1]).l2
    np.testing.assert_allclose(result.attention_mass[0], mass.numpy(), rtol=1e-5, atol=1e-6)
    rows = {r["selector"]: r for r in result.agreement.to_dict(orient="records")}
    local_hits, oracle_hits = [], []
    for t in range(3, T):
        top_impact = set(np.argsort(-impact[t, : t + 1].numpy(), kind="stable")[:3].tolist())
        local_hits.append(len(top_impact & {t - 2, t - 1, t}) / 3)
        top_mass = set(np.argsort(-mass[t, : t + 1].numpy(), kind="stable")[:3].tolist())
        oracle_hits.append(len(top_impact & top_mass) / 3)
    assert rows["local"]["impact_recall_at_k"] == pytest.approx(np.mean(local_hits))
    assert rows["attention_mass"]["impact_recall_at_k"] == pytest.approx(np.mean(oracle_hits))
    assert rows["local"]["n_queries"] == T - 3 and math.isnan(rows["local"]["spearman"])
    assert set(rows) == {"attention_mass", "local", "random"}  # sink_local needs k > sink_tokens (4)


def test_impact_command_writes_its_files(model_dir, tmp_path, capsys):
    out = tmp_path / "impact"
    result = run_analysis_cli(["impact", "--model", str(model_dir), "--prompt", f"Hi {HOSTILE} there, friend.",
                               "--k", "2", "6", "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparse_viz-output.json", "agreement.csv", "agreement.png",
                                                     "impact.npz", "metadata.json", "report.html"]
    table = pd.read_csv(out / "agreement.csv")
    assert set(table["layer"]) == {0, 1, 2} and set(table["k"]) == {2, 6}
    arrays = np.load(out / "impact.npz")
    T = len(json.loads((out / "metadata.json").read_text())["tokens"])
    assert arrays["l2"].shape == (3, T, T) and np.isnan(arrays["l2"][:, 0, 1]).all()


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k values must be >= 1"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--layers", "7"], "outside 0-2"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "impact"
    result = run_analysis_cli(["impact", "--model", str(model_dir), "--prompt", "Hi there.", "--output", str(out),
                               *argv], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "impact:" not in line]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.browser
def test_impact_report_hover_shows_the_query_row_and_hostile_tokens_stay_text(model_dir, tmp_path, capsys, chromium):  # noqa: F811
    out = tmp_path / "impact"
    result = run_analysis_cli(["impact", "--model", str(model_dir), "--prompt", f"Hi {HOSTILE} there, friend.",
                               "--k", "2", "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    with open_report(chromium, out / "report.html") as report:
        page = report.page
        assert page.locator("#layer-select option").count() == 3
        assert page.locator("#agreement tbody tr").count() == 3  # attention_mass, local, random at k = 2
        box = page.locator("#matrix").bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + box["height"] * 0.55)  # key 0 of a middle query
        title = page.locator("#row-title").text_content()
        assert title.startswith("query ") and title != "query 0"
        assert page.locator("#row-impact rect").count() == int(title.split()[1].rstrip(":")) + 1
        assert page.locator("img").count() == 0
        assert HOSTILE in page.locator("#summary").text_content()
        page.select_option("#layer-select", "2")
        # the matrix names its tokens on both axes (the tokenizer's own tokens, as the page shows them)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokens = [tokenizer.decode([i]) for i in tokenizer(f"Hi {HOSTILE} there, friend.")["input_ids"]]
        for axis in ("#matrix-rows", "#matrix-cols"):
            labels = page.locator(f"{axis} text.tok-label")
            shown = {int(labels.nth(i).get_attribute("data-position")): labels.nth(i).text_content()
                     for i in range(labels.count())}
            assert 0 in shown and len(shown) >= len(tokens) // 3
            assert shown == {t: tokens[t].replace(" ", "\u00b7")[:10] for t in shown}
        report.screenshot("impact")


def test_agreement_png_legend_beside_the_panels_and_an_empty_table_says_why():
    import matplotlib.pyplot as plt
    import pandas as pd

    from sparse_viz.report.impact import agreement_plot

    rows = [{"layer": layer, "selector": selector, "k": k, "impact_recall_at_k": 0.1 * layer + 0.2,
             "impact_share": 0.5, "spearman": None, "n_queries": 3}
            for k in (2, 4) for selector in ("attention_mass", "local", "random") for layer in range(3)]
    fig = agreement_plot(pd.DataFrame(rows))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["attention_mass", "local", "random"]
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        area = ax.get_window_extent(renderer)
        assert not (box.x0 < area.x1 and area.x0 < box.x1 and box.y0 < area.y1 and area.y0 < box.y1)
        assert ax.get_legend() is None
    plt.close(fig)

    empty = pd.DataFrame(columns=["layer", "selector", "k", "impact_recall_at_k", "impact_share", "spearman", "n_queries"])
    fig = agreement_plot(empty)
    assert not fig.legends and any("nothing to compare" in t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)


def test_impact_with_every_k_above_the_prompt_says_so(model_dir, tmp_path, capsys):
    out = tmp_path / "impact"
    result = run_analysis_cli(["impact", "--model", str(model_dir), "--prompt", "abc", "--k", "8",
                               "--no-report", "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    assert "no selector is compared" in result.stderr and "Empty DataFrame" not in result.stdout
    assert (out / "agreement.png").is_file() and (out / "impact.npz").is_file()
