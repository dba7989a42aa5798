"""Sparse evaluation: perplexity under each selection and coverage of the dense attention, against
hand computations and a brute-force layer-by-layer forward."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from analysis_cli import run_analysis_cli
from browser import chromium, open_report  # noqa: F401 - `chromium` is a fixture
from test_selected_attention import brute_force_logits
from tiny_models import save_tiny, tiny_llama

from sparse_viz.analysis.sparse_eval.evaluation import coverage, evaluate_selectors
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.loading import LoadedModel
from sparse_viz.pretrained.selected_attention import KeySelection

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 40


def test_coverage_by_hand():
    mass = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.6, 0.1, 0.3, 0.0],
        [0.1, 0.2, 0.3, 0.4],
    ])
    selected = torch.tensor([[0, -1], [0, 1], [1, 2], [0, 3]])  # k = 2: rows 2 and 3 count
    m, r = coverage(selected, mass, 2)
    # row 2 keeps 0.1 + 0.3, top-2 = {0, 2} -> 1 of 2; row 3 keeps 0.1 + 0.4, top-2 = {3, 2} -> 1 of 2
    assert m == pytest.approx((0.4 + 0.5) / 2) and r == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=ArchitectureAdapter.for_model(model),
                         device=torch.device("cpu"), dtype=torch.float32, name_or_path="tiny")
    windows = torch.tensor(tokenizer(TEXT)["input_ids"][:48]).view(2, 24)
    return loaded, windows


def test_perplexities_equal_the_cross_entropy_of_dense_and_brute_force_forwards(tiny):
    loaded, windows = tiny
    result = evaluate_selectors(loaded, windows, k=[4], selectors=["dense", "local", "oracle"])
    table = result.table.set_index("selector")
    with torch.no_grad():
        dense_logits = loaded.model(input_ids=windows).logits
        local_logits = torch.cat([brute_force_logits(loaded.model, w[None], KeySelection("local", top_k=4)) for w in windows])
    def ppl(logits):
        return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())
    assert table.loc["dense", "perplexity"] == pytest.approx(ppl(dense_logits), rel=1e-5)
    assert table.loc["local", "perplexity"] == pytest.approx(ppl(local_logits), rel=1e-5)
    assert table.loc["local", "relative_to_dense"] == pytest.approx(ppl(local_logits) / ppl(dense_logits), rel=1e-5)
    # coverage: the oracle keeps the dense top-k at layer 0 (its input is the dense model's), so recall 1 there
    layers = result.layers.set_index(["selector", "layer"])
    assert layers.loc[("oracle", 0), "recall_at_k"] == pytest.approx(1.0)
    assert layers.loc[("local", 0), "mass_at_k"] < layers.loc[("oracle", 0), "mass_at_k"] + 1e-9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = tiny_llama()
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "book.txt").write_text(TEXT * 3)
    return folder


def test_sparse_eval_command_writes_table_plot_and_report(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    result = run_analysis_cli(["sparse-eval", "--model", str(model_dir), "--corpus", str(corpus), "--seq-len", "32",
                               "--windows", "2", "--k", "4", "8", "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".sparse_viz-output.json", "coverage.csv", "metadata.json",
                                                     "perplexity.csv", "perplexity.png", "report.html"]
    table = pd.read_csv(out / "perplexity.csv")
    assert len(table) == 1 + 4 * 2 - 1  # dense + 4 selectors x 2 k, sink_local only at k = 8 > 4 sinks


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k values must be >= 1"),
    (["--selectors", "nearest"], "unknown selector"),
    (["--windows", "500"], "need 16000"),
    (["--selectors", "topk"], "needs trained indexers"),
])
def test_bad_input_is_one_line_exit_2(model_dir, corpus, tmp_path, capsys, argv, message):
    out = tmp_path / "eval"
    result = run_analysis_cli(["sparse-eval", "--model", str(model_dir), "--corpus", str(corpus), "--seq-len", "32",
                               "--output", str(out), *argv], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "selectors:" not in line]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.browser
def test_sparse_eval_report_draws_lines_per_selector(model_dir, corpus, tmp_path, capsys, chromium):  # noqa: F811
    out = tmp_path / "eval"
    result = run_analysis_cli(["sparse-eval", "--model", str(model_dir), "--corpus", str(corpus), "--seq-len", "32",
                               "--windows", "1", "--k", "4", "8", "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    with open_report(chromium, out / "report.html") as report:
        page = report.page
        assert page.locator("#ppl-chart path").count() >= 4  # one line per selector (+ axis paths)
        assert page.locator("#ppl-table tbody tr").count() == 8
        page.select_option("#metric-select", "recall_at_k")
        report.screenshot("sparse_eval")


def test_perplexity_png_legend_lies_beside_the_axes():
    import matplotlib.pyplot as plt

    from sparse_viz.report.sparse_eval import perplexity_plot

    table = pd.DataFrame([{"selector": "dense", "k": 0, "perplexity": 30.0}] + [
        {"selector": s, "k": k, "perplexity": 30.0 + 1000.0 / k * (i + 1)}
        for i, s in enumerate(("local", "sink_local", "random", "oracle")) for k in (16, 32, 64)])
    fig = perplexity_plot(table)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= area.x1  # right of the plotting area, not on it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["local", "sink_local", "random", "oracle", "dense"]
    plt.close(fig)
