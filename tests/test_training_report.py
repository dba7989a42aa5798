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
from sparse_viz.report.training import DEFINITIONS, PAD_INDEX, build_payload, render_training_report
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
                               tokens=["A", " b", XSS_TOKEN, "\n"])


def _decode(text: str, dtype: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


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
