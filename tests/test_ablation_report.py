"""Head / component ablation from the command line: files, report in Chromium, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_cli import run_analysis_cli
from browser import chromium, open_report  # noqa: F401  (pytest fixture)
from safetensors.torch import save_file
from tiny_models import save_tiny, tiny_llama, tiny_qwen3

from sparse_viz.analysis.cli import main

HOSTILE = 'Hi </script><img src=x onerror=alert(1)> "q" & bye'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = tiny_qwen3()
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "qwen3")


def run_cli(argv, capsys):
    result = run_analysis_cli(argv, capsys)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def heads_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["heads", "--model", str(model_dir), "--prompt", HOSTILE, "--sweep", "--batch-size", "5",
              "--output", str(out), "--prediction-positions", "-1", "3"])
    assert exit_info.value.code == 0
    return out


def test_heads_cli_writes_csv_npz_pngs_and_report(heads_run, model_dir):
    table = pd.read_csv(heads_run / "head_ablation.csv")
    assert list(table["ablation"]) == [f"L{L}.H{h}" for L in range(3) for h in range(4)]
    for column in ["layer", "head", "positions", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]:
        assert column in table.columns
    assert (table["positions"] == "all").all()
    # the CSV numbers are an independent plain pre-hook's numbers (not just our own echo)
    model, tokenizer = tiny_qwen3()
    ids = tokenizer(HOSTILE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits, -1)
    handle = model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: (torch.cat([a[0][..., :8], torch.zeros_like(a[0][..., 8:16]), a[0][..., 16:]], -1),))
    with torch.no_grad():
        abl = torch.log_softmax(model(ids).logits, -1)
    handle.remove()
    kl = (base.exp() * (base - abl)).sum(-1).mean()
    assert table.set_index("ablation").loc["L2.H1", "kl_divergence"] == pytest.approx(float(kl), rel=1e-3)
    arrays = np.load(heads_run / "head_ablation_patterns.npz")
    assert arrays["baseline_layer0"].shape == (1, 4, ids.shape[1], ids.shape[1])
    assert arrays["kl_per_position"].shape == (12, 1, ids.shape[1])
    assert (heads_run / "plots" / "head_ablation_heatmap.png").stat().st_size > 1000
    assert list((heads_run / "plots").glob("patterns_*_seq0.png"))
    predictions = json.loads((heads_run / "predictions.json").read_text())
    assert [p["position"] for p in predictions["L0.H0"]] == [ids.shape[1] - 1, 3]
    html = (heads_run / "report.html").read_text()
    assert "<img src=x" not in html and "</script><img" not in html
    # re-rendering from report_data.json (no torch, no model) gives the same page
    from sparse_viz.report.ablation import render_ablation_report

    copy = heads_run.parent / "rerender"
    copy.mkdir()
    (copy / "report_data.json").write_text((heads_run / "report_data.json").read_text())
    assert render_ablation_report(copy).read_text() == html


def _tokens_of(text):
    """The tiny model's tokens of `text`, from its own tokenizer (the reference for metadata)."""
    _, tokenizer = tiny_qwen3()
    ids = tokenizer(text)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def test_heads_metadata_records_the_command_and_the_definitions(heads_run, model_dir):
    """metadata.json (README: "definitions, timings") holds the command's own arguments."""
    metadata = json.loads((heads_run / "metadata.json").read_text())
    assert metadata["command"] == "heads" and metadata["analysis"] == "heads"
    assert metadata["model"] == str(model_dir)
    assert metadata["prompts"] == [HOSTILE]
    arguments = metadata["arguments"]
    assert arguments["sweep"] is True and arguments["batch_size"] == 5
    assert arguments["prediction_positions"] == [-1, 3] and arguments["output"] == str(heads_run)
    assert metadata["tokens"] == [_tokens_of(HOSTILE)]
    assert metadata["timings"]["load_seconds"] >= 0 and metadata["timings"]["analysis_seconds"] > 0
    table = pd.read_csv(heads_run / "head_ablation.csv")
    metric_columns = {"kl_divergence", "frac_top1_changed", "delta_logprob_top1"} & set(table.columns)
    assert metric_columns <= set(metadata["definitions"])  # every metric column is defined


@pytest.mark.parametrize("what", [["--ablate", "1.o_proj:0,1", "--mode", "stochastic", "--samples", "2"],
                                  ["--sweep", "0.o_proj:0-2"]])
def test_component_metadata_records_the_command(model_dir, tmp_path, capsys, what):
    out = tmp_path / "out"
    code, _, err = run_cli(["components", "--model", str(model_dir), "--prompt", "abcdefgh", *what,
                            "--no-patterns", "--output", str(out)], capsys)
    assert code == 0, err
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["command"] == "components" and metadata["prompts"] == ["abcdefgh"]
    assert metadata["analysis"] == ("component_sweep" if "--sweep" in what else "components")
    key = "sweep" if "--sweep" in what else "ablate"
    assert metadata["arguments"][key] == [what[1]]
    if "--mode" in what:
        assert metadata["arguments"]["mode"] == "stochastic" and metadata["arguments"]["samples"] == 2
    assert metadata["tokens"] == [_tokens_of("abcdefgh")]
    assert set(metadata["timings"]) == {"load_seconds", "analysis_seconds"}
    csv = pd.read_csv(out / ("component_sweep.csv" if "--sweep" in what else "component_ablation.csv"))
    assert {"kl_divergence", "frac_top1_changed", "reconstruction_kl"} <= set(csv.columns) & set(metadata["definitions"])


@pytest.mark.browser
def test_head_report_heatmap_click_shows_patterns_and_predictions(heads_run, chromium):  # noqa: F811
    with open_report(chromium, heads_run / "report.html") as report:
        page = report.page
        assert page.locator("#heatmap rect.cell").count() == 12
        assert page.locator("#ablation-table tbody tr").count() == 12
        page.locator('#heatmap rect.cell[data-name="L1.H2"]').click()
        assert page.locator("#detail-title").text_content().startswith("Ablation L1.H2:")
        assert page.locator("#layer-select").input_value() == "2"  # the layer after the ablated one
        # the ablated canvas is drawn (not the grey "no data" fill) and differs from baseline
        drawn = page.evaluate("""() => ['baseline-canvas', 'ablated-canvas'].map(id => {
            const c = document.getElementById(id); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + 2 * d[i + 1] + 3 * d[i + 2]; return [c.width, s]; })""")
        assert drawn[0][0] > 1 and drawn[0][1] != drawn[1][1]
        assert page.locator("#predictions table").count() == 2  # positions -1 and 3
        assert page.locator("#predictions table").first.locator("tbody tr").count() == 5
        page.select_option("#metric-select", "frac_top1_changed")
        page.locator("#head-select").select_option("3")
        # hostile prompt text is shown as text, never as markup
        assert page.locator("img").count() == 0
        report.screenshot("head_ablation_report")


def _legend(page, selector):
    legend = page.locator(selector)
    assert legend.count() == 1, selector
    return float(legend.get_attribute("data-min")), float(legend.get_attribute("data-max"))


def _visible(token: str) -> str:
    """How the page shows a token (SV.tokenLabel, cut to 10 characters)."""
    shown = token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u00b7")
    return shown if len(shown) <= 10 else shown[:9] + "\u2026"


@pytest.mark.browser
def test_head_report_explains_itself_colour_scales_and_token_labels(heads_run, chromium):  # noqa: F811
    """The layer x head grid has a colour scale spanning 0 .. the largest effect in the CSV;
    each pattern has a colour scale and token labels on both axes; the per-position KL bars
    name their tokens."""
    table = pd.read_csv(heads_run / "head_ablation.csv")
    singles = table[table["kind"] == "head"]
    tokens = _tokens_of(HOSTILE)
    with open_report(chromium, heads_run / "report.html") as report:
        page = report.page
        assert _legend(page, "#heatmap svg.color-legend") == pytest.approx((0, singles["kl_divergence"].max()), rel=1e-6)
        page.select_option("#metric-select", "delta_logprob_top1")
        assert _legend(page, "#heatmap svg.color-legend") == pytest.approx((0, singles["delta_logprob_top1"].min()), rel=1e-6)
        page.select_option("#metric-select", "frac_top1_changed")
        assert _legend(page, "#heatmap svg.color-legend") == pytest.approx((0, singles["frac_top1_changed"].max()), rel=1e-6)
        # the heatmap fills the panel rather than a narrow strip
        grid_width = page.evaluate("() => document.querySelector('#heatmap svg:not(.color-legend)').getBoundingClientRect().width")
        assert grid_width >= 4 * 60
        for kind in ("baseline", "ablated"):
            assert _legend(page, f'figure[data-kind="{kind}"] svg.color-legend') == (0, 1)
        low, high = _legend(page, 'figure[data-kind="diff"] svg.color-legend')
        assert low == -high and high > 0
        for axis in ("y-tokens", "x-tokens"):
            labels = page.locator(f'figure[data-kind="baseline"] svg.{axis} text.tok-label')
            shown = {int(labels.nth(i).get_attribute("data-position")): labels.nth(i).text_content() for i in range(labels.count())}
            assert len(shown) >= len(tokens) // 3 and 0 in shown
            assert shown == {t: _visible(tokens[t]) for t in shown}
        bars = page.locator("#kl-positions text.tok-label")
        shown = {int(bars.nth(i).get_attribute("data-position")): bars.nth(i).text_content() for i in range(bars.count())}
        assert len(shown) >= len(tokens) // 3 and shown == {t: _visible(tokens[t]) for t in shown}
        report.screenshot("head_ablation_report_scales")


@pytest.mark.browser
def test_component_report_shows_the_adversarial_masks(model_dir, tmp_path, capsys, chromium):  # noqa: F811
    out = tmp_path / "components"
    code, stdout, err = run_cli(["components", "--model", str(model_dir), "--prompt", "abcdefgh", "--ablate", "1.o_proj:0,1",
                                 "--mode", "adversarial", "--ci-default", "0.5", "--pgd-steps", "3", "--output", str(out)], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "component_ablation.csv")
    assert table.loc[0, "mode"] == "adversarial" and table.loc[0, "n_components_ablated"] == 2
    arrays = np.load(out / "component_ablation_patterns.npz")
    mask = arrays["mask:model.layers.1.self_attn.o_proj"]
    assert (mask[:2] == 0).all() and (mask[2:] >= 0.5 - 1e-6).all()
    assert (out / "plots" / "component_masks.png").is_file()
    with open_report(chromium, out / "report.html") as report:
        page = report.page
        assert not page.locator("#masks-panel").is_hidden()
        bars = page.locator("#masks svg.mask-chart rect")
        assert bars.count() == 32
        assert page.locator("#masks svg.mask-chart text.x-label").text_content() == "component index, 0-31 (×: ablated)"
        heights = page.evaluate("() => Array.from(document.querySelectorAll('#masks svg.mask-chart rect')).map(r => [r.getAttribute('fill'), +r.getAttribute('height')])")
        assert [h for f, h in heights if f == "#d62728"] == [0, 0]  # ablated: mask 0
        assert [h / 70 for f, h in heights if f != "#d62728"] == pytest.approx(mask[2:].tolist(), abs=1e-5)  # THE adversarial masks
        assert "ADVERSARIAL MASKS" in page.locator("#notes").text_content()
        report.screenshot("component_ablation_report")


@pytest.mark.browser
def test_component_sweep_cli_and_report(model_dir, tmp_path, capsys, chromium):  # noqa: F811
    """`components --sweep`: one CSV row per component, bar chart per module, click shows that component."""
    out = tmp_path / "sweep"
    lines = tmp_path / "prompts.txt"
    lines.write_text("xy\n")  # a shorter second sequence: padded
    code, stdout, err = run_cli(["components", "--model", str(model_dir), "--prompt", HOSTILE, "--prompt-lines", str(lines),
                                 "--sweep", "1.q_proj:0-5", "0.o_proj", "--batch-size", "7", "--output", str(out)], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "component_sweep.csv")
    assert list(table["ablation"]) == [f"1.q_proj:{c}" for c in range(6)] + [f"0.o_proj:{c}" for c in range(32)]
    assert (table["kl_divergence"] >= 0).all() and table["kl_divergence"].max() > 0
    for module, group in table.groupby("module"):
        assert group["component_norm"].is_monotonic_decreasing, module  # SVD: s_0 >= s_1 >= ...
    assert (table["n_positions"] == table.loc[0, "n_positions"]).all()
    assert (out / "plots" / "component_sweep.png").is_file()
    assert np.load(out / "component_sweep_patterns.npz")["kl_per_position"].shape[:2] == (38, 2)
    assert "0.o_proj" in stdout or "1.q_proj" in stdout
    with open_report(chromium, out / "report.html") as report:
        page = report.page
        assert not page.locator("#sweep-panel").is_hidden() and page.locator("#masks-panel").is_hidden()
        assert page.locator("#sweep svg.sweep-chart").count() == 2
        assert page.locator("#sweep rect.bar").count() == 38
        assert page.locator("#sweep svg.sweep-chart text.x-label").all_text_contents() == [
            "component index (each ablated alone)"] * 2
        ticks = page.locator("#sweep svg.sweep-chart").nth(1).locator(".x-axis .tick text").all_text_contents()
        assert ticks[0] == "0" and set(ticks) <= {str(c) for c in range(32)} and len(ticks) >= 5
        page.locator('#sweep rect.bar[data-name="0.o_proj:3"]').click()
        assert page.locator("#detail-title").text_content().startswith("Ablation 0.o_proj:3")
        assert page.locator("#ablation-table tbody tr.selected td").first.text_content() == "0.o_proj:3"
        assert page.locator("img").count() == 0  # the hostile prompt stays text
        report.screenshot("component_sweep_report")


@pytest.mark.parametrize("argv, message", [
    (["heads", "--ablate", "7.0"], "layer 7 out of range"),
    (["heads", "--ablate", "1.9"], "head 9 out of range"),
    (["heads", "--ablate", "1:2"], "malformed head spec"),
    (["heads", "--ablate-kv", "0.5"], "kv head 5 out of range"),
    (["heads"], "nothing to ablate"),
    (["components", "--ablate", "0.q_proj:99"], "outside 0-31"),
    # an unknown module name lists the valid forms (short and full paths)
    (["components", "--ablate", "0.foo_proj:1"], "PROJ one of q_proj, k_proj, v_proj, o_proj"),
    (["components", "--sweep", "model.layers.0.mlp.up"], "e.g. model.layers.0.self_attn.q_proj,"),
    (["components", "--ablate", "0.q_proj:1", "--mode", "stochastic", "--ci-default", "2"], "ci-default must lie in"),
    (["components", "--sweep", "0.q_proj:40"], "outside 0-31"),
    (["components", "--sweep", "0.q_proj", "--mode", "adversarial"], "--sweep runs deterministic ablations only"),
    (["components", "--sweep", "0.q_proj", "--ablate", "0.q_proj:1"], "not allowed with argument"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, _, err = run_cli([*argv, "--model", str(model_dir), "--prompt", "abcdef", "--output", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_refuses_to_replace_a_folder_that_is_not_an_ablation_run(model_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["heads", "--model", str(model_dir), "--prompt", "abc", "--ablate", "0.1", "--output", str(out)], capsys)
    assert code == 2 and "sparse_viz did not write" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_mismatched_decomposition_file_exits_2(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_file({"model.layers.0.self_attn.k_proj.V": torch.zeros(32, 4),
               "model.layers.0.self_attn.k_proj.U": torch.zeros(4, 32)}, bad)  # k_proj writes 16, not 32
    out = tmp_path / "out"
    code, _, err = run_cli(["components", "--model", str(model_dir), "--prompt", "abc", "--decomposition", str(bad),
                            "--ablate", "0.k_proj:0", "--output", str(out)], capsys)
    assert code == 2 and "U has shape (4, 32), expected (C, 16)" in err
    assert not out.exists()


def test_several_prompts_padded_metrics_cover_every_sequence(tmp_path, capsys):
    model, tokenizer = tiny_llama()
    directory = save_tiny(model, tokenizer, tmp_path / "llama")
    lines = tmp_path / "prompts.txt"
    lines.write_text("a much longer second prompt\nxy\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["heads", "--model", str(directory), "--prompt", "first", "--prompt-lines", str(lines),
                            "--ablate", "0.1", "--output", str(out)], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "head_ablation.csv")
    lengths = [len(tokenizer(p)["input_ids"]) for p in ["first", "a much longer second prompt", "xy"]]
    assert table.loc[0, "n_positions"] == sum(lengths)  # all positions of all sequences, no padding
    arrays = np.load(out / "head_ablation_patterns.npz")
    assert arrays["baseline_layer1"].shape[0] == 3  # patterns kept per sequence
    # reference per sequence, unpadded, through a plain pre-hook
    kls = []
    for p in ["first", "a much longer second prompt", "xy"]:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base = torch.log_softmax(model(ids).logits, -1)
            h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
                lambda m, a: (torch.cat([a[0][..., :8], torch.zeros_like(a[0][..., 8:16]), a[0][..., 16:]], -1),))
            abl = torch.log_softmax(model(ids).logits, -1)
            h.remove()
        kls.append((base.exp() * (base - abl)).sum(-1)[0])
    assert table.loc[0, "kl_divergence"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-3)


@pytest.mark.parametrize("T", [6, 70])
def test_pattern_png_has_token_labels_and_a_colour_scale(T):
    from sparse_viz.report.ablation import patterns_figure

    rng = np.random.default_rng(0)
    tokens = [f" t{i}" for i in range(T)]
    fig = patterns_figure(rng.random((2, T, T)), rng.random((2, T, T)), tokens, "layer 1")
    fig.canvas.draw()
    first_column, bottom_left = fig.axes[0], fig.axes[2]  # axes are row-major: (0,0), (0,1), (1,0), (1,1)
    for labels, ticks in ((first_column.get_yticklabels(), first_column.get_yticks()),
                          (bottom_left.get_xticklabels(), bottom_left.get_xticks())):
        shown = {int(t): label.get_text() for t, label in zip(ticks, labels)}
        assert 0 in shown and len(shown) >= min(T, 20)
        assert shown == {t: tokens[t].replace(" ", "\u00b7") for t in shown}
    (colorbar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colorbar.get_ylabel() == "attention probability" and colorbar.get_ylim() == (0, 1)
