"""Plots are made from the stored files of a run directory only."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image
from test_tracking_analyse import write_synthetic_run

from sparse_viz.report.plots import (STAGE_COLOURS, attention_patterns_figure, indexer_behavior_figure, render_plots,
                                     selection_heatmap_figure)
from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("plots") / "run", n_snapshots=4)


def test_summary_pngs_and_one_heatmap_per_snapshot(run_dir):
    written = render_plots(run_dir, heatmap_layers=[1])
    plots = run_dir / "plots"
    assert plots / "attention_patterns.png" in written and plots / "indexer_behavior.png" in written
    for name, panels_wide in (("attention_patterns.png", 3), ("indexer_behavior.png", 2)):
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width > 300 * panels_wide
    heatmaps = sorted(p.name for p in (plots / "selection").iterdir())
    assert heatmaps == [f"step_{s:07d}.png" for s in RunStore(run_dir).steps()]
    assert not list(plots.rglob(".*.tmp"))


def test_heatmaps_already_rendered_are_not_redrawn(run_dir):
    render_plots(run_dir)
    again = render_plots(run_dir)
    assert all(p.parent.name == "plots" for p in again)  # only the two summary figures


def test_plots_need_only_the_history_when_snapshot_arrays_are_missing(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_snapshots=2)
    for npz in (run / "analysis").glob("step_*.npz"):
        npz.unlink()
    written = render_plots(run)
    assert [p.name for p in written] == ["attention_patterns.png", "indexer_behavior.png"]


def test_heatmap_pixels_follow_the_stored_selection(tmp_path):
    """The per-snapshot heatmap is drawn from the npz: changing the stored selection changes it."""
    run = write_synthetic_run(tmp_path / "run", n_snapshots=1)
    store = RunStore(run)
    render_plots(run, heatmap_layers=[0])
    first = np.asarray(Image.open(run / "plots" / "selection" / "step_0000000.png").convert("L"))
    arrays = store.load_snapshot(0)
    arrays["show_selected"][:] = -1  # nothing selected: only the grey visible triangle is left
    (run / "plots" / "selection" / "step_0000000.png").unlink()
    np.savez(store.snapshot_path(0), **arrays)
    render_plots(run, heatmap_layers=[0])
    empty = np.asarray(Image.open(run / "plots" / "selection" / "step_0000000.png").convert("L"))
    assert first.shape == empty.shape
    # dark pixels: selected cells + axis text before; axis text only after
    assert (first < 100).sum() > (empty < 100).sum() + 200


# ---------------------------------------------------------------------------- what the panels show
# The figures are inspected as data (lines, bars, step patches, images), not pixels: each panel
# must show the stored history / snapshot arrays, recomputed here with plain loops.
def layer_mean(array: np.ndarray) -> list[float]:
    """Mean over the layer axis of a (L, N) array, NaN entries left out (all NaN -> NaN)."""
    out = []
    for column in np.asarray(array, dtype=np.float64).T:
        finite = [float(v) for v in column if np.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def lines_by_label(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for line in ax.get_lines()}


def history_series(history: list[dict], name: str) -> list[float]:
    return [float("nan") if r.get(name) is None else float(r[name]) for r in history]


@pytest.fixture(scope="module")
def figures_input(run_dir):
    """(history, snapshots) of the synthetic run, with one layer's value removed (NaN) in a few
    places of the last snapshot: a layer without a value must be left out of a layer mean."""
    store = RunStore(run_dir)
    history = store.read_history()
    snapshots = {int(r["step"]): store.load_snapshot(r["step"]) for r in history}
    last = snapshots[max(snapshots)]
    for name in ("pos_freq", "type_share", "head_spec"):
        last[name] = last[name].copy()
        last[name][0, 1] = np.nan  # layer 0 only; layer 1 keeps its value
    return history, snapshots


def test_attention_patterns_panels_show_the_stored_values(figures_input):
    history, snapshots = figures_input
    steps = [int(r["step"]) for r in history]
    fig = attention_patterns_figure(history, snapshots)
    position, entropy, scores, quality, _, versus_loss = fig.axes[:6]

    shown = lines_by_label(position)
    assert sorted(shown) == sorted(f"step {s}" for s in steps)  # 4 snapshots: all drawn
    for step in steps:
        _, y = shown[f"step {step}"]
        np.testing.assert_allclose(y, layer_mean(snapshots[step]["pos_freq"]), rtol=1e-6, equal_nan=True)
    assert np.isfinite(shown[f"step {steps[-1]}"][1][1])  # the NaN of layer 0 did not blank it

    shown = lines_by_label(entropy)
    for label, name in (("attention used (sparse)", "entropy_sparse"), ("dense attention", "entropy_dense")):
        x, y = shown[label]
        assert x.tolist() == steps
        np.testing.assert_allclose(y, history_series(history, name), rtol=1e-9)

    shown = lines_by_label(quality)
    for label, name in (("mass@k indexer", "mass_at_k"), ("mass@k oracle", "mass_at_k_oracle"),
                        ("mass@k random", "mass_at_k_random"), ("mass@k local", "mass_at_k_local"),
                        ("mass@k sink+local", "mass_at_k_sink_local"), ("recall@k indexer", "recall_at_k"),
                        ("keys attended / visible", "keys_share")):
        np.testing.assert_allclose(shown[label][1], history_series(history, name), rtol=1e-9, equal_nan=True)

    # score distribution: every layer's histogram, pooled into 40 common bins by bin centre, as shares
    patches = {p.get_label(): p.get_data() for p in scores.patches}
    for i in (0, len(steps) // 2 if len(steps) > 2 else 1, len(steps) - 1):
        arrays = snapshots[steps[i]]
        edges, hist = arrays["score_edges"], arrays["score_hist"]
        lo, hi = float(np.nanmin(edges)), float(np.nanmax(edges))
        pooled = [0.0] * 40
        for layer in range(edges.shape[0]):
            for j in range(hist.shape[1]):
                centre = (float(edges[layer, j]) + float(edges[layer, j + 1])) / 2
                pooled[min(int((centre - lo) / (hi - lo) * 40), 39)] += float(hist[layer, j])
        values, common, _ = patches[f"step {steps[i]}"]
        assert common[0] == pytest.approx(lo) and common[-1] == pytest.approx(hi)
        np.testing.assert_allclose(values, np.array(pooled) / sum(pooled), atol=1e-9)

    # selection quality vs validation loss: one point per snapshot, (mass@k, val_loss)
    (points,) = versus_loss.collections
    expected = [(m, v) for m, v in zip(history_series(history, "mass_at_k"), history_series(history, "val_loss"))]
    np.testing.assert_allclose(points.get_offsets(), np.array(expected), rtol=1e-9)


def test_indexer_behavior_panels_show_the_stored_values(figures_input):
    history, snapshots = figures_input
    steps = [int(r["step"]) for r in history]
    fig = indexer_behavior_figure(history, snapshots)
    specialisation, score, biases, types = fig.axes[:4]

    shown = lines_by_label(specialisation)
    n_heads = snapshots[steps[0]]["head_spec"].shape[1]
    for head in range(n_heads):
        expected = [layer_mean(snapshots[s]["head_spec"])[head] for s in steps]
        np.testing.assert_allclose(shown[f"head {head}"][1], expected, rtol=1e-6)

    shown = lines_by_label(score)
    np.testing.assert_allclose(shown["mean"][1], history_series(history, "score_mean"), rtol=1e-9)
    np.testing.assert_allclose(shown["min / max"][1], history_series(history, "score_min"), rtol=1e-9)
    (band,) = score.collections  # mean ± std
    upper = [m + s for m, s in zip(history_series(history, "score_mean"), history_series(history, "score_std"))]
    assert np.max(band.get_paths()[0].vertices[:, 1]) == pytest.approx(max(upper))

    shown = lines_by_label(biases)
    for label, name in (("sink share (key 0)", "sink_share"), ("local-window share (t - s < k)", "local_share"),
                        ("Jaccard with previous snapshot", "jaccard_prev")):
        np.testing.assert_allclose(shown[label][1], history_series(history, name), rtol=1e-9, equal_nan=True)

    # token types at the last snapshot: selected share next to the base rate, per type present
    # in the probe (base rate > 0); the absent ones are named under the panel, not drawn empty
    last = snapshots[steps[-1]]
    base_rate = layer_mean(last["type_base"])
    present = [i for i, b in enumerate(base_rate) if b > 0]
    absent = [TOKEN_TYPES[i] for i, b in enumerate(base_rate) if not b > 0]
    assert absent, "the synthetic probe should lack some token type (as Shakespeare lacks digits)"
    selected_bars, base_bars = types.containers
    assert selected_bars.get_label() == f"selected keys (step {steps[-1]})"
    np.testing.assert_allclose([b.get_height() for b in selected_bars],
                               [layer_mean(last["type_share"])[i] for i in present], rtol=1e-6)
    np.testing.assert_allclose([b.get_height() for b in base_bars], [base_rate[i] for i in present], rtol=1e-6)
    assert [t.get_text() for t in types.get_xticklabels()] == [TOKEN_TYPES[i] for i in present]
    assert all(name in types.get_xlabel() for name in absent)


def test_selection_heatmap_colours_exactly_the_selected_cells_by_dense_attention(run_dir):
    store = RunStore(run_dir)
    step = store.steps()[-1]
    arrays = store.load_snapshot(step)
    fig = selection_heatmap_figure(arrays, [1], step)
    grey, coloured = fig.axes[0].get_images()  # visible unselected cells, then the selected ones
    grey_blank, colour_blank = np.ma.getmaskarray(grey.get_array()), np.ma.getmaskarray(coloured.get_array())
    selected, dense = arrays["show_selected"][1], arrays["show_dense"][1]
    T = selected.shape[0]
    for t in range(T):
        chosen = {int(s): slot for slot, s in enumerate(selected[t]) if s >= 0}
        for s in range(T):
            if s in chosen:
                assert grey_blank[t, s] and not colour_blank[t, s]
                assert coloured.get_array()[t, s] == pytest.approx(np.sqrt(dense[t, chosen[s]]), rel=1e-6)
            else:  # grey where visible, nothing in the future
                assert colour_blank[t, s] and grey_blank[t, s] == (s > t)


def test_stage_bands_span_each_stage_from_its_first_snapshot_to_the_next_stages():
    history = [{"step": s, "stage": stage, "entropy_dense": 1.0, "entropy_sparse": 1.0}
               for s, stage in ((0, "dense"), (10, "dense"), (20, "warmup"), (30, "sparse"), (40, "sparse"))]
    fig = attention_patterns_figure(history, {})
    entropy = fig.axes[1]
    bands = [(p.get_x(), p.get_x() + p.get_width(), to_hex(p.get_facecolor())) for p in entropy.patches]
    assert bands == [(0, 20, STAGE_COLOURS["dense"]), (20, 30, STAGE_COLOURS["warmup"]),
                     (30, 40, STAGE_COLOURS["sparse"])]


# ------------------------------------------------------------------- figures that explain themselves
def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("make", [attention_patterns_figure, indexer_behavior_figure])
def test_panels_say_they_average_layers_and_legends_sit_beside_the_data(figures_input, make):
    """Each panel names what it shows over layers (the HTML shows layer by layer, so a PNG
    number must not pass for one layer's); every legend lies outside every data area; the
    stage bands have a legend naming the stages in the order they ran, in their colours."""
    history, snapshots = figures_input
    n_layers = next(iter(snapshots.values()))["pos_freq"].shape[0]
    fig = make(history, snapshots)
    renderer = _drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_title()]  # colour bars have no title
    for ax in panels:
        assert f"mean over the {n_layers} layers" in ax.get_title() or "layers pooled" in ax.get_title() \
            or "every layer" in ax.get_title(), ax.get_title()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert len(legends) >= 3
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in panels:
            assert not _overlaps(box, ax.get_window_extent(renderer)), (legend.get_texts()[0].get_text(), ax.get_title())
    (stages,) = fig.legends
    order = list(dict.fromkeys(r["stage"] for r in history))
    assert [t.get_text() for t in stages.get_texts()] == [f"{stage} stage" for stage in order]
    assert [to_hex(p.get_facecolor()) for p in stages.get_patches()] == [STAGE_COLOURS[s] for s in order]


def test_panels_without_an_indexer_say_why_instead_of_standing_empty():
    """A dense baseline's history (no indexer scores, no selection scalars): the indexer panels
    carry a sentence saying why they are empty, and no empty legend box."""
    history = [{"step": s, "stage": "dense", "entropy_dense": 1.0, "entropy_sparse": 1.0} for s in (0, 10, 20)]
    fig = indexer_behavior_figure(history, {})
    specialisation, score, biases, types = fig.axes[:4]
    for ax, reason in ((specialisation, "no indexer"), (score, "no indexer"), (biases, "no key selection"),
                       (types, "no snapshot arrays")):
        assert ax.get_legend() is None
        assert not ax.get_lines() and not ax.containers
        assert any(reason in text.get_text() for text in ax.texts), (ax.get_title(), [t.get_text() for t in ax.texts])


def test_a_dense_runs_selection_frequency_panel_says_why_it_is_empty(figures_input):
    """A dense run stores NaN selection frequencies (nothing is selected): no empty lines, no
    legend, a sentence instead."""
    history, snapshots = figures_input
    dense = {step: {**arrays, "pos_freq": np.full_like(arrays["pos_freq"], np.nan)} for step, arrays in snapshots.items()}
    position = attention_patterns_figure(history, dense).axes[0]
    assert not position.get_lines() and position.get_legend() is None
    assert any("no key selection recorded" in t.get_text() for t in position.texts)


def test_each_colour_bar_sits_right_beside_its_own_panel(figures_input):
    """The two scatter panels colour points by training step: each one's colour bar (found through
    its scatter, not by position) is within 1% of the figure's width of the panel's edge, and
    no taller than the panel, in figure coordinates after layout."""
    history, snapshots = figures_input
    fig = attention_patterns_figure(history, snapshots)
    _drawn(fig)
    scatter_panels = [ax for ax in fig.axes if ax.get_title() and ax.collections]
    assert len(scatter_panels) == 2
    for ax in scatter_panels:
        bars = {id(c.colorbar): c.colorbar for c in ax.collections if getattr(c, "colorbar", None) is not None}
        assert len(bars) == 1, ax.get_title()
        panel, bar = ax.get_position(), next(iter(bars.values())).ax.get_position()
        gap = max(bar.x0 - panel.x1, panel.x0 - bar.x1)  # whichever side it is on
        assert 0 <= gap <= 0.01, (ax.get_title(), gap)
        assert panel.y0 - 1e-6 <= bar.y0 and bar.y1 <= panel.y1 + 1e-6, (ax.get_title(), panel, bar)


def test_no_axis_shows_an_offset_instead_of_its_values():
    """Values that differ only in the fourth decimal (entropy 5.2451-5.2453, steps past 100000)
    make matplotlib write ticks as 0.0001, 0.0002 with '+5.245' above the axis; every axis of
    every figure must show the values themselves (no offset text once drawn)."""
    from sparse_viz.report.plots import ground_truth_figure

    history = []
    for i in range(4):
        near = 5.2451 + 0.0001 * i * 2 / 3  # 5.2451 ... 5.2453
        history.append({"step": 100_000 + 10 * i, "stage": "sparse", "entropy_sparse": near, "entropy_dense": near + 1e-5,
                        "score_mean": near, "score_std": 1e-5, "score_min": near - 1e-5, "score_max": near + 1e-5,
                        "sink_share": 0.5 + 1e-5 * i, "local_share": 0.5, "mass_at_k": 0.5 + 1e-5 * i,
                        "val_loss": near, "L0/gt_mass": 0.5 + 1e-5 * i, "answer_accuracy": 0.5})
    for make in (lambda: attention_patterns_figure(history, {}), lambda: indexer_behavior_figure(history, {}),
                 lambda: ground_truth_figure(history)):
        fig = make()
        _drawn(fig)
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                assert axis.get_offset_text().get_text() == "", (ax.get_title(), axis.axis_name,
                                                                 axis.get_offset_text().get_text())
