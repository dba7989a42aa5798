"""`python -m sparse_viz.report RUN_DIR` and the report payload, without a browser."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tracking_analyse import XSS_TOKEN, write_synthetic_run

from sparse_viz.errors import UserInputError
from sparse_viz.report.training import DEFINITIONS, PAD_INDEX, build_payload, render_training_report, view_snapshots
from sparse_viz.tracking.store import RunStore

REPO = Path(__file__).resolve().parents[1]
# Run the CLI and check afterwards that torch was never imported: the report re-renders from
# disk without it (exit status 3 if it was).
NO_TORCH = (
    "import sys, runpy\n"
    "sys.argv = ['sparse_viz.report'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('sparse_viz.report', run_name='__main__')\n"
    "finally:\n"
    "    if 'torch' in sys.modules:\n"
    "        print('torch was imported', file=sys.stderr); sys.exit(3)\n"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("report") / "run", n_snapshots=3,
                               tokens=["A", " b", XSS_TOKEN, "\n"], stages=["dense", "warmup", "sparse"])


def _decode(texts: list[str], dtype: str, shape) -> np.ndarray:
    """The views' arrays: one base64 string per snapshot, stacked to `shape` (S, ...)."""
    assert len(texts) == shape[0]
    return np.stack([np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape[1:])
                     for text in texts])


def test_cli_renders_plots_and_report_without_torch(run_dir):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(run_dir), "--heatmap-layers", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("report.html", "plots/attention_patterns.png", "plots/indexer_behavior.png",
                 "plots/selection/step_0000020.png"):
        assert (run_dir / name).is_file(), name
    assert str(run_dir / "report.html") in result.stdout


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: tmp / "missing", "run directory not found"),
    (lambda tmp: tmp, "no selection history"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, make_bad, message):
    target = make_bad(tmp_path)
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(target)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("python -m sparse_viz.report: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_rejects_malformed_heatmap_layers(run_dir):
    result = subprocess.run([sys.executable, "-m", "sparse_viz.report", str(run_dir), "--heatmap-layers", "a,b"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--heatmap-layers" in result.stderr


def test_payload_arrays_decode_to_the_stored_snapshot(run_dir):
    payload = build_payload(run_dir)
    views = payload["views"]
    store = RunStore(run_dir)
    S, L, T, k = views["S"], views["L"], views["T"], views["k"]
    assert views["steps"] == store.steps() == payload["steps"]
    sel = _decode(views["sel"], "u2", (S, L, T, k))
    mass = _decode(views["mass"], "f4", (S, L, T))
    dense = _decode(views["dense"], "u1", (S, L, T, k))
    lo, hi = _decode(views["score_lo"], "f4", (S, L, T)), _decode(views["score_hi"], "f4", (S, L, T))
    score = _decode(views["score"], "u1", (S, L, T, k))
    for i, step in enumerate(views["steps"]):
        arrays = store.load_snapshot(step)
        stored = arrays["show_selected"].astype(np.int64)
        assert np.array_equal(np.where(sel[i] == PAD_INDEX, -1, sel[i].astype(np.int64)), stored)
        real = stored >= 0
        # sqrt-quantised probabilities: (q / 255)^2 within half a quantisation step of sqrt(p)
        assert np.allclose((dense[i][real] / 255.0), np.sqrt(arrays["show_dense"][real]), atol=0.5 / 255 + 1e-6)
        restored = lo[i][..., None] + score[i] / 255.0 * (hi[i] - lo[i])[..., None]
        assert np.allclose(restored[real], arrays["show_score"][real], atol=(hi[i] - lo[i]).max() / 255 + 1e-5)
        assert np.allclose(mass[i], np.nan_to_num(arrays["show_mass"], nan=-1.0), atol=1e-6)
    history = store.read_history()
    assert payload["history"]["L1/mass_at_k"] == pytest.approx([r["L1/mass_at_k"] for r in history], abs=1e-6)
    assert [d[0] for d in payload["definitions"]] == [d[0] for d in DEFINITIONS]


def test_untrusted_tokens_cannot_close_the_script_element(run_dir):
    html = render_training_report(run_dir).read_text(encoding="utf-8")
    body = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    assert "<" not in body and ">" not in body
    assert XSS_TOKEN in json.loads(body)["tokens"]


def test_build_payload_errors_name_the_problem(tmp_path):
    with pytest.raises(UserInputError, match="no selection history"):
        build_payload(tmp_path)


def test_payload_views_of_attention_used_dense_top_k_and_score_range_match_the_snapshot(run_dir):
    """Per query of probe row 0: the attention used (sqrt-quantised like the dense one), the dense
    top-k keys, and the min / max of the selected keys' indexer scores (the range the uint8
    scores are quantised in), recomputed slot by slot."""
    payload = build_payload(run_dir)
    views = payload["views"]
    store = RunStore(run_dir)
    S, L, T, k = views["S"], views["L"], views["T"], views["k"]
    attn = _decode(views["attn"], "u1", (S, L, T, k))
    dense_top = _decode(views["dense_top"], "u2", (S, L, T, k))
    lo, hi = _decode(views["score_lo"], "f4", (S, L, T)), _decode(views["score_hi"], "f4", (S, L, T))
    for i, step in enumerate(views["steps"]):
        arrays = store.load_snapshot(step)
        for layer in range(L):
            for t in range(T):
                real = [slot for slot in range(k) if arrays["show_selected"][layer, t, slot] >= 0]
                for slot in real:
                    used = float(arrays["show_attn"][layer, t, slot])
                    assert attn[i, layer, t, slot] == round(255 * used ** 0.5)
                scores = [float(arrays["show_score"][layer, t, slot]) for slot in real]
                assert lo[i, layer, t] == pytest.approx(min(scores), rel=1e-6)
                assert hi[i, layer, t] == pytest.approx(max(scores), rel=1e-6)
                top = [int(s) for s in arrays["show_dense_top"][layer, t]]
                assert [PAD_INDEX if s < 0 else s for s in top] == dense_top[i, layer, t].tolist()


def test_payload_history_columns_and_labels_follow_the_history_lines(run_dir):
    """Every numeric field of the history becomes one column (None where a line lacks it or
    holds NaN / null), rounded to 6 decimals; per-snapshot labels are copied in step order."""
    payload = build_payload(run_dir)
    history = RunStore(run_dir).read_history()
    numeric = {name for r in history for name, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(payload["history"]) >= numeric
    assert not {"stage", "attention", "selection_source", "top_tokens"} & set(payload["history"])
    for name, column in payload["history"].items():
        for record, value in zip(history, column, strict=True):
            raw = record.get(name)
            if raw is None or raw != raw:
                assert value is None, name
            else:
                assert value == pytest.approx(raw, abs=5e-7), name
    assert payload["steps"] == [r["step"] for r in history]
    assert payload["stages"] == [r["stage"] for r in history]
    assert payload["attention"] == [r["attention"] for r in history]
    assert payload["source"] == [r["selection_source"] for r in history]
    assert payload["top_tokens"] == [r["top_tokens"] for r in history]
    probe = RunStore(run_dir).read_probe()
    assert payload["tokens"] == probe["tokens"]
    assert payload["run"]["top_k"] == probe["top_k"] and payload["run"]["n_layers"] == probe["n_layers"]


def test_payload_views_leave_out_snapshots_without_arrays(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_snapshots=3)
    RunStore(run).snapshot_path(10).unlink()
    payload = build_payload(run)
    assert payload["steps"] == [0, 10, 20]  # the history still has every snapshot
    assert payload["views"]["steps"] == [0, 20] and payload["views"]["S"] == 2


def test_views_over_budget_keep_evenly_spaced_snapshots_with_the_first_and_last():
    """The per-query views of a run too large for a light page are thinned (the curves are not):
    9 snapshots of 3 MB under a 12 MB budget keep 4, spread over the run."""
    steps = [0, 50, 100, 150, 200, 250, 300, 350, 400]
    assert view_snapshots(steps, 3 * 2**20, 12 * 2**20) == [0, 150, 250, 400]
    assert view_snapshots(steps, 1 * 2**20, 12 * 2**20) == steps  # all fit
    assert view_snapshots(steps, 100 * 2**20, 12 * 2**20) == [0, 400]  # never fewer than the ends


def test_a_payload_over_budget_carries_views_of_the_chosen_snapshots_only(run_dir):
    payload = build_payload(run_dir, max_view_bytes=1)
    views = payload["views"]
    assert views["steps"] == [payload["steps"][0], payload["steps"][-1]] and views["S"] == 2
    assert len(views["sel"]) == 2 and len(payload["history"]["step"]) == len(payload["steps"])  # curves keep all


def _heatmaps(run: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((run / "plots" / "selection").glob("*.png"))}


def _report_cli(run: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(run), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_heatmap_layers_redraws_the_heatmaps_of_a_run_that_has_them(tmp_path):
    """A run whose heatmaps exist (all layers) and are newer than their snapshots: asking for
    --heatmap-layers 1 rewrites every snapshot's heatmap, now one panel narrower (one layer
    instead of two, same height), and asking again rewrites them again; without the option an
    up-to-date heatmap is left as it is."""
    import os

    from PIL import Image

    run = write_synthetic_run(tmp_path / "run", n_snapshots=2, n_layers=2)
    assert _report_cli(run).returncode == 0
    store = RunStore(run)
    old = 1_000_000_000  # 2001: the snapshots, then the heatmaps (still newer than their snapshots)
    for step in store.steps():
        os.utime(store.snapshot_path(step), (old, old))
    for png in (run / "plots" / "selection").glob("*.png"):
        os.utime(png, (old + 10, old + 10))
    before = _heatmaps(run)
    assert sorted(before) == [f"step_{s:07d}.png" for s in store.steps()]
    sizes = {name: Image.open(run / "plots" / "selection" / name).size for name in before}

    assert _report_cli(run).returncode == 0  # the default: up to date, not redrawn
    assert _heatmaps(run) == before

    result = _report_cli(run, "--heatmap-layers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    after = _heatmaps(run)
    assert sorted(after) == sorted(before)  # no file added or removed
    for name, (mtime, data) in after.items():
        assert mtime > before[name][0] and data != before[name][1], name
        assert str(run / "plots" / "selection" / name) in result.stdout
        width, height = Image.open(run / "plots" / "selection" / name).size
        assert height == sizes[name][1] and width < sizes[name][0] * 0.75, (name, (width, height), sizes[name])

    for png in (run / "plots" / "selection").glob("*.png"):
        os.utime(png, (old + 10, old + 10))
    assert _report_cli(run, "--heatmap-layers", "1").returncode == 0
    assert all(mtime > old * 10**9 + 10 * 10**9 for mtime, _ in _heatmaps(run).values())


@pytest.mark.parametrize("argv, message", [
    (["--heatmap-layers", "0,5"], "--heatmap-layers 5: the run's snapshots have layers 0-1"),
    (["--heatmap-layers", ","], "--heatmap-layers names no layer"),
    (["--heatmap-layers", "0", "--no-plots"], "--no-plots"),
])
def test_heatmap_layers_that_cannot_take_effect_are_one_line_exit_2_and_write_nothing(tmp_path, argv, message):
    run = write_synthetic_run(tmp_path / "run", n_snapshots=2, n_layers=2)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    result = _report_cli(run, *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_rerendering_a_run_leaves_files_it_did_not_draw_as_they_were(tmp_path):
    """`python -m sparse_viz.report RUN` writes only its own files (report.html, plots/*.png it draws):
    a user's notes in the run, in plots/ and in plots/selection/ keep their bytes."""
    run = write_synthetic_run(tmp_path / "run", n_snapshots=2, n_layers=2)
    mine = {run / "notes.md": "run notes", run / "plots" / "my_figure.svg": "<svg/>",
            run / "plots" / "selection" / "step_0000001_annotated.png": "not a heatmap"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for argv in ((), ("--heatmap-layers", "0"), ("--no-plots",)):
        assert _report_cli(run, *argv).returncode == 0
        assert {path: path.read_text() for path in mine} == mine, argv
