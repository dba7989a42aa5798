"""Plots are made from the stored files of a run directory only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_tracking_analyse import write_synthetic_run

from sparse_viz.report.plots import render_plots
from sparse_viz.tracking.store import RunStore


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
