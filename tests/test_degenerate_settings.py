"""Settings that run but cannot show what they seem to are said to be so: a k at or above the
sequence length (every query sees at most k keys, so every selector keeps every key and equals
dense) is warned about, its coverage is missing (not 1.0), a run where every k is such is
refused (sparse-eval) or says that nothing is compared (impact), and the reports say
"no informative query" / why the agreement table is empty instead of drawing numbers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_cli import run_analysis_cli
from browser import chromium, open_report  # noqa: F401 - `chromium` is a fixture
from tiny_models import save_tiny, tiny_llama, tiny_qwen3

from sparse_viz.analysis.impact.experiment import run_impact_analysis
from sparse_viz.analysis.sparse_eval.evaluation import coverage, evaluate_selectors
from sparse_viz.errors import SettingWarning, UserInputError, exit_on_user_error
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.loading import LoadedModel, load_model
from sparse_viz.report.impact import impact_payload, render_impact_report
from sparse_viz.report.sparse_eval import render_sparse_eval_report, sparse_eval_payload

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 40
T = 24  # window length of the library tests


# ----------------------------------------------------------------------------- the warning's format


def test_a_setting_warning_prints_as_one_line_under_a_command(capsys):
    """Under `exit_on_user_error` (every command's entry point) a SettingWarning is one line
    `PROG: warning: message`, not Python's file:line header plus the source of the warn call;
    other warnings keep Python's format."""
    def main():
        warnings.warn("k = 9 is >= the window length of 8 tokens: every selector equals dense", SettingWarning)
        warnings.warn("an ordinary warning", UserWarning)

    with pytest.warns(UserWarning, match="an ordinary warning") as record:  # passed on to the usual handler
        with pytest.raises(SystemExit) as exit_info:
            exit_on_user_error(main, "python -m tool")
    assert exit_info.value.code == 0
    assert capsys.readouterr().err == \
        "python -m tool: warning: k = 9 is >= the window length of 8 tokens: every selector equals dense\n"
    assert [w.category for w in record] == [UserWarning]


# ----------------------------------------------------------------------------- sparse-eval, library


def test_coverage_of_a_k_no_query_exceeds_is_missing_not_one():
    """T = 4 keys at most, k = 4: no query has more than k keys, so there is no informative
    query and both numbers are NaN (it returned 1.0, 1.0)."""
    mass = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.6, 0.1, 0.3, 0], [0.1, 0.2, 0.3, 0.4]])
    selected = torch.tensor([[0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3]])
    for k in (4, 5):
        m, r = coverage(selected, mass, k)
        assert math.isnan(m) and math.isnan(r)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, adapter=ArchitectureAdapter.for_model(model),
                         device=torch.device("cpu"), dtype=torch.float32, name_or_path="tiny")
    windows = torch.tensor(tokenizer(TEXT)["input_ids"][: 2 * T]).view(2, T)
    return loaded, windows


@pytest.fixture(scope="module")
def boundary_result(tiny):
    """k = T - 1 (one informative query per window), T and T + 6 (none), local selector."""
    loaded, windows = tiny
    with pytest.warns(SettingWarning) as record:
        result = evaluate_selectors(loaded, windows, k=[T - 1, T, T + 6], selectors=["dense", "local"])
    return result, [str(w.message) for w in record if issubclass(w.category, SettingWarning)]


def test_each_k_at_or_above_the_window_length_is_warned_about_by_name(boundary_result):
    _, messages = boundary_result
    assert len(messages) == 2
    for k, message in zip((T, T + 6), messages):
        assert f"k = {k} is >= the window length of {T} tokens" in message and "equals dense" in message
    assert not any(f"k = {T - 1} " in m for m in messages)


def test_coverage_counts_only_informative_queries_and_is_nan_without_one(tiny, boundary_result):
    """k = T - 1: only the last query (t = T - 1, T keys) is informative. The local window keeps
    keys 1..T-1 of it, so mass@k = 1 - p[T-1, 0] and recall@k = 1 if key 0 has the row's lowest
    p (the dense top-(T-1) is every key but the lowest) else (k - 1) / k, p = the dense
    attention averaged over heads, read from the model itself; averaged over the windows.
    k = T and T + 6: NaN for every layer (there is no informative query), never 1.0."""
    loaded, windows = tiny
    result, _ = boundary_result
    layers = result.layers
    with torch.no_grad():
        attentions = [loaded.model(input_ids=w[None], output_attentions=True, use_cache=False).attentions for w in windows]
    k = T - 1
    for layer in range(loaded.adapter.n_layers):
        rows = [a[layer][0].double().mean(0)[T - 1] for a in attentions]  # (T,) per window
        mass = np.mean([1.0 - float(p[0]) for p in rows])
        recall = np.mean([1.0 if int(torch.argmin(p)) == 0 else (k - 1) / k for p in rows])
        row = layers[(layers.selector == "local") & (layers.k == k) & (layers.layer == layer)].iloc[0]
        assert row.mass_at_k == pytest.approx(mass, rel=1e-5) and row.recall_at_k == pytest.approx(recall)
    for k in (T, T + 6):
        part = layers[layers.k == k]
        assert len(part) == loaded.adapter.n_layers and part.mass_at_k.isna().all() and part.recall_at_k.isna().all()


def test_every_k_at_or_above_the_window_length_is_refused(tiny):
    loaded, windows = tiny
    with pytest.raises(UserInputError, match=f"every k \\({T}, {T + 100}\\) is >= the window length of {T} tokens"):
        evaluate_selectors(loaded, windows, k=[T, T + 100], selectors=["dense", "local"])


# ----------------------------------------------------------------------------- sparse-eval, command


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "book.txt").write_text(TEXT * 3)
    return folder


def test_sparse_eval_command_warns_in_one_line_and_writes_empty_coverage(llama_dir, corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    result = run_analysis_cli(["sparse-eval", "--model", str(llama_dir), "--corpus", str(corpus), "--seq-len", "32",
                               "--windows", "1", "--k", "4", "64", "--selectors", "dense", "local",
                               "--output", str(out)], capsys)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warned) == 1 and warned[0].startswith("python -m sparse_viz.analysis: warning: k = 64 is >= the "
                                                     "window length of 32 tokens"), result.stderr
    assert "SettingWarning" not in result.stderr and "warnings.warn" not in result.stderr
    table = pd.read_csv(out / "coverage.csv")
    assert table[table.k == 64].mass_at_k.isna().all() and table[table.k == 4].mass_at_k.notna().all()


def test_sparse_eval_command_with_every_k_too_large_is_one_line_exit_2(llama_dir, corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    result = run_analysis_cli(["sparse-eval", "--model", str(llama_dir), "--corpus", str(corpus), "--seq-len", "32",
                               "--windows", "1", "--k", "512", "--output", str(out)], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "every k (512) is >= the window length of 32 tokens" in lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- sparse-eval, report


@pytest.mark.browser
def test_sparse_eval_report_says_no_informative_query_instead_of_a_value(chromium, tiny, boundary_result, tmp_path):  # noqa: F811
    result, _ = boundary_result
    payload = sparse_eval_payload(result.table, result.layers, result.metadata)
    # the payload carries a missing value, not a number (1.0 before)
    assert all(r["mass_at_k"] is None and r["recall_at_k"] is None for r in payload["layers"] if r["k"] >= T)
    path = render_sparse_eval_report(tmp_path, payload, "degenerate k")
    with open_report(chromium, path) as report:
        page = report.page
        note = page.locator("#layer-note")
        for k in (T, T + 6):
            for metric in ("mass_at_k", "recall_at_k"):
                page.select_option("#k-select", str(k))
                page.select_option("#metric-select", metric)
                assert note.is_visible() and "no informative query" in note.text_content().lower()
                assert f"k = {k}" in note.text_content()
                assert page.locator("#layer-chart circle").count() == 0  # nothing drawn as a value
        page.select_option("#k-select", str(T - 1))
        assert not note.is_visible()
        assert page.locator("#layer-chart circle").count() == result.layers[result.layers.k == T - 1].shape[0]
        cells = page.locator("#ppl-table tbody td:nth-child(2)").all_text_contents()
        assert f"{T} (≥ {T} tokens: dense)" in cells and str(T - 1) in cells
        report.screenshot("sparse_eval_degenerate_k")


# ----------------------------------------------------------------------------- impact


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    model, tokenizer = tiny_qwen3()
    return load_model(save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "qwen3"), device="cpu")


def test_impact_warns_about_each_k_the_prompt_is_too_short_for(qwen3):
    """'abc' is 4 tokens (BOS + one per byte): k = 2 is compared, k = 8 cannot be and is named."""
    with pytest.warns(SettingWarning, match="k = 8 is >= the prompt's 4 tokens") as record:
        result = run_impact_analysis("abc", model=qwen3, layers=[0], k=[2, 8])
    assert sum(issubclass(w.category, SettingWarning) for w in record) == 1
    assert set(result.agreement.k) == {2}


def test_impact_with_every_k_above_the_prompt_says_nothing_is_compared(qwen3):
    with pytest.warns(SettingWarning, match=r"every k \(8, 16\) is >= the prompt's 4 tokens.*no selector is compared"):
        result = run_impact_analysis("abc", model=qwen3, layers=[0], k=[8, 16])
    assert result.agreement.empty and result.l2.shape == (1, 4, 4)  # the impact itself is still there


def _impact_report(tmp_path, ks, agreement_rows):
    T = 4
    l2 = np.where(np.tril(np.ones((1, T, T))) > 0, 0.5, np.nan).astype(np.float32)
    agreement = pd.DataFrame(agreement_rows, columns=["layer", "selector", "k", "impact_recall_at_k", "impact_share",
                                                      "spearman", "n_queries"])
    payload = impact_payload([0], ["<bos>", "a", "b", "c"], l2, l2, agreement,
                             {"k": ks, "model": "synthetic", "prompt": "abc", "definitions": {}})
    return render_impact_report(tmp_path, payload)


@pytest.mark.browser
def test_impact_report_explains_an_empty_agreement_table(chromium, tmp_path):  # noqa: F811
    with open_report(chromium, _impact_report(tmp_path, [8, 16], [])) as report:
        page = report.page
        note = page.locator("#agreement-note")
        assert note.is_visible()
        text = note.text_content()
        assert "the prompt has 4 tokens" in text and "8, 16" in text and "nothing to compare" in text
        assert not page.locator("#agreement").is_visible()  # no empty table under it
        report.screenshot("impact_empty_agreement")


@pytest.mark.browser
def test_impact_report_names_the_k_left_out_of_the_table(chromium, tmp_path):  # noqa: F811
    rows = [(0, name, 2, 0.5, 0.5, None, 2) for name in ("attention_mass", "local", "random")]
    with open_report(chromium, _impact_report(tmp_path, [2, 8], rows)) as report:
        page = report.page
        assert page.locator("#agreement tbody tr").count() == 3 and page.locator("#agreement").is_visible()
        note = page.locator("#agreement-note")
        assert note.is_visible() and "k = 8" in note.text_content() and "4 tokens" in note.text_content()


def test_sparse_eval_with_every_k_at_least_the_window_is_refused_before_the_model_loads(tmp_path, capsys):
    """The model path does not exist: only a check made before loading can answer with the k."""
    result = run_analysis_cli(["sparse-eval", "--model", str(tmp_path / "no-model"), "--k", "512", "--seq-len", "128",
                               "--output", str(tmp_path / "out")], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "every k (512)" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
