"""The interactive training report `report.html` of a run, built from its files on disk.

`render_run(run_dir)` = plots (`report/plots.py`) + `render_training_report(run_dir)`; it reads
only `analysis/` (through the numpy-only `RunStore`), so it works without torch or the model:
`python -m sparse_viz.report RUN_DIR`.

Payload (compact: 50 snapshots x 4 layers x 256 tokens x k=32 is ~15 MB of base64 and parses
in well under a second): the probe's token strings; the history as columns; and for every
snapshot, layer and query of probe row 0 the selected keys (uint16, 65535 = empty slot), their
indexer scores (uint8, min-max within the row, with the row's min/max as float32), the sparse
and dense attention on them (uint8 of sqrt(p), so small probabilities keep resolution), the
dense top-k keys (uint16), and the row's mass@k (float32). Typed arrays travel as base64
little-endian bytes, one string per snapshot; the page decodes a snapshot the first time it shows
it (a long probe's report, e.g. 9 snapshots x 2 layers x 1024 queries x k=256, is ready after one
snapshot's decoding instead of all of them).
"""

from __future__ import annotations

import base64
import math
import os
import sys
from pathlib import Path

import numpy as np

from sparse_viz.errors import UserInputError
from sparse_viz.report.html import render_report
from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES

PAD_INDEX = 65535

# Shown in the report's definitions panel; the same definitions are the docstrings of
# sparse_viz/tracking/metrics.py.
DEFINITIONS = [
    ("probe", "A fixed batch of validation sequences, the same at every snapshot. The token view "
     "and the heatmap show its first row; the scalars average over all of its rows."),
    ("selection", "The keys a query attends to: in a sparse stage the keys the attention used; in "
     "a dense stage (pre-training, indexer warm-up) the indexer's top-k over the visible keys, i.e. "
     "what it would select ('selection_source' says which)."),
    ("informative rows", "Query t sees t+1 keys; rows with t+1 <= k are dense (everything "
     "selected) and trivially perfect, so mass@k, recall@k, Jaccard, frequencies, sink/local shares "
     "and token types average over the rows t+1 > k only."),
    ("p (dense attention)", "Dense causal attention probabilities on the same queries and keys, "
     "averaged over the main heads: p[t,s] = mean_h A_h[t,s]. The ground truth for selection quality."),
    ("mass@k", "Share of dense-attention mass on the selected keys, sum over s in S_t of p[t,s], "
     "averaged over informative queries; equal to each head's mass on the selection averaged over heads."),
    ("mass@k baselines", "The same mass@k for the selections of the local (last k keys), "
     "sink+local (first sink_tokens + the most recent), random (k random visible keys, seeded) "
     "and oracle (top-k of p, the best any k-selection can do) selectors on the same probe."),
    ("recall@k", "Share of the dense top-k keys (top-k of p) that the selection contains, "
     "|S_t ∩ D_t| / k, averaged over informative queries."),
    ("KL", "KL(p[t,:] || softmax(I[t,:])) over the visible keys s <= t, in nats, averaged over "
     "all queries: the indexer's warm-up loss."),
    ("Jaccard", "|S_t ∩ S'_t| / |S_t ∪ S'_t| between this snapshot's selection and the previous "
     "snapshot's, per query, averaged over informative queries: 1 = nothing changed."),
    ("selection frequency", "By position: the share of informative queries that see key s and "
     "select it. By distance: the same for the key at distance d = t - s."),
    ("sink share", "Share of the selected keys (informative rows) that are token 0."),
    ("local-window share", "Share of the selected keys within the last k positions (t - s < k): "
     "what the local selector would also have kept."),
    ("indexer scores", "I[t,s] over the visible pairs: histogram, mean, std, min, max."),
    ("head specialisation", "For indexer head j, 1 - H(a_j[t,:]) / log(t+1) averaged over queries, "
     "with a_j[t,s] the head's share of its absolute contribution |w[t,j] ReLU(q_j·k_s)| over the "
     "visible keys: 0 = spread evenly, 1 = one key. Redundancy: mean correlation between the heads' maps."),
    ("attention entropy", "-sum_s a log a of each head's attention row, in nats, averaged over heads "
     "and queries; for the attention actually used (sparse) and the dense attention."),
    ("token types", "Share of selections whose key is punctuation, whitespace, contains digits, "
     "capitalised, frequent (the most common ids covering 50% of training tokens) or rare (the "
     "least common ids covering 10%), next to the share of visible keys of that type."),
    ("efficiency", "Keys attended / keys visible, mean over queries of min(k, t+1)/(t+1) "
     "(1 in a dense stage); tokens/s = training tokens per second of training-step time since "
     "the previous snapshot (the callback's own time excluded)."),
    ("validation loss", "The latest validation loss known at the snapshot, measured at step "
     "'val_loss_step' (Lightning validates after a step's callbacks, so a validation at the "
     "snapshot's own step appears at the next snapshot); empty before the first validation."),
]


# Added to the definitions when the run's task has ground truth (associative recall).
GROUND_TRUTH_DEFINITIONS = [
    ("ground truth", "In associative recall, the answer position t (a query key, whose next token is "
     "the value) has its pair earlier in the sequence: the matching key's position and its value's "
     "position. Only the value's position can carry the answer under causal attention."),
    ("ground-truth hit@k", "Share of the answer positions whose selected keys include the value's "
     "position, for the run's selection and for the local, sink+local, random and oracle selections "
     "of the same probe (key hit@k: the same for the key's position)."),
    ("ground-truth mass", "Dense attention probability (mean over heads) on the value's position, "
     "averaged over the answer positions; 'used' is the same for the attention that actually ran."),
    ("answer accuracy", "Share of the probe's answer positions where the model's top prediction is the value."),
]


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


def _sqrt_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.sqrt(np.clip(np.nan_to_num(values), 0.0, 1.0)) * 255).astype(np.uint8)


def _columns(history: list[dict]) -> dict[str, list]:
    """History as columns of numbers (keys of non-numeric values are left out)."""
    names: list[str] = []
    for record in history:
        for name, value in record.items():
            if name not in names and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
                names.append(name)
    columns = {}
    for name in names:
        column = []
        for record in history:
            value = record.get(name)
            column.append(None if value is None or not math.isfinite(float(value)) else round(float(value), 6))
        columns[name] = column
    return columns


# Raw bytes of per-query views a report carries (base64 adds a third). A page that must read and
# parse more than ~25 MB of HTML is not ready within a second (measured: a 42.6 MB report of a
# T = 4096 run, 9 snapshots x 2 layers x 1024 queries x k = 256, took 1.1-1.3 s in Chromium).
MAX_VIEW_BYTES = 12 * 2**20


def view_snapshots(steps: list[int], bytes_per_snapshot: int, max_bytes: int = MAX_VIEW_BYTES) -> list[int]:
    """The snapshots whose per-query views the report carries: all of them when they fit in
    `max_bytes`, else as many as fit, evenly spaced, the first and the last always among them.
    What is stored on disk is untouched; the history's curves keep every snapshot."""
    n = max(2, max_bytes // max(1, bytes_per_snapshot))
    if len(steps) <= n:
        return list(steps)
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))
    return [steps[i] for i in picks]


def build_payload(run_dir: str | os.PathLike, max_view_bytes: int = MAX_VIEW_BYTES) -> dict:
    """Everything `training.js` needs, read from the run directory.

    Args:
        run_dir: the run directory.
        max_view_bytes: budget for the per-query views (`view_snapshots`).

    Raises:
        UserInputError: the directory has no recorded snapshots.
    """
    store = RunStore(run_dir)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run directory not found: {run_dir}")
    if not store.exists():
        raise UserInputError(f"no selection history in {run_dir} (expected {store.history_path})")
    history = store.read_history()
    if not history:
        raise UserInputError(f"{store.history_path} has no snapshots")
    probe = store.read_probe() if store.probe_path.is_file() else {}

    stored = [int(r["step"]) for r in history if store.snapshot_path(int(r["step"])).is_file()]
    if stored:
        L, T, k = store.load_snapshot(stored[-1], ["show_selected"])["show_selected"].shape  # sizing only
        stored = view_snapshots(stored, L * T * (7 * k + 12), max_view_bytes)  # 7 bytes per slot, 12 per row
    view_steps, sel, dense_top, score_q, score_lo, score_hi, attn_q, dense_q, mass = ([] for _ in range(9))
    for step in stored:
        arrays = store.load_snapshot(step)
        selected = arrays["show_selected"].astype(np.int64)  # (L, T, k)
        real = selected >= 0
        scores = np.where(real, arrays["show_score"], np.nan).astype(np.float64)
        with np.errstate(invalid="ignore", all="ignore"):
            finite = np.isfinite(scores)
            lo = np.where(finite.any(-1), np.nanmin(np.where(finite, scores, np.inf), axis=-1), 0.0)
            hi = np.where(finite.any(-1), np.nanmax(np.where(finite, scores, -np.inf), axis=-1), 0.0)
            span = np.where(hi > lo, hi - lo, 1.0)
            q = np.round((np.nan_to_num(scores, nan=0.0) - lo[..., None]) / span[..., None] * 255)
        view_steps.append(step)
        sel.append(np.where(real, selected, PAD_INDEX).astype(np.uint16))
        top = arrays["show_dense_top"].astype(np.int64)
        dense_top.append(np.where(top >= 0, top, PAD_INDEX).astype(np.uint16))
        score_q.append(np.clip(q, 0, 255).astype(np.uint8))
        score_lo.append(lo.astype(np.float32))
        score_hi.append(hi.astype(np.float32))
        attn_q.append(_sqrt_uint8(arrays["show_attn"]))
        dense_q.append(_sqrt_uint8(arrays["show_dense"]))
        mass.append(np.nan_to_num(arrays["show_mass"], nan=-1.0).astype(np.float32))

    views = None
    if view_steps:
        S = len(view_steps)
        L, T, k = sel[0].shape
        views = {
            "steps": view_steps, "S": S, "L": L, "T": T, "k": k, "pad": PAD_INDEX,
            # one base64 string per snapshot: the page decodes a snapshot when it first shows it
            "sel": [_b64(a, "u2") for a in sel], "dense_top": [_b64(a, "u2") for a in dense_top],
            "score": [_b64(a, "u1") for a in score_q], "score_lo": [_b64(a, "f4") for a in score_lo],
            "score_hi": [_b64(a, "f4") for a in score_hi], "attn": [_b64(a, "u1") for a in attn_q],
            "dense": [_b64(a, "u1") for a in dense_q], "mass": [_b64(a, "f4") for a in mass],
        }
    n_layers = int(probe.get("n_layers", views["L"] if views else 0))
    return {
        "run": {
            "name": probe.get("run_name", run_dir.name),
            "top_k": probe.get("top_k"),
            "n_layers": n_layers,
            "seq_len": probe.get("seq_len"),
            "selector": probe.get("selector"),
            "every_n_steps": probe.get("every_n_steps"),
            "probe_rows": probe.get("probe_rows"),
        },
        "tokens": [str(t) for t in probe.get("tokens", [])],
        "steps": [int(r["step"]) for r in history],
        "stages": [str(r.get("stage", "")) for r in history],
        "attention": [str(r.get("attention", "")) for r in history],
        "source": [str(r.get("selection_source", "")) for r in history],
        "history": _columns(history),
        "top_tokens": [r.get("top_tokens", []) for r in history],
        "token_types": list(TOKEN_TYPES),
        "views": views,  # steps: the snapshots with per-query views (all of them unless over budget)
        "definitions": [list(d) for d in DEFINITIONS + (GROUND_TRUTH_DEFINITIONS if probe.get("answers") else [])],
        "answers": [[int(v) for v in row] for row in probe.get("answers", [])],
    }


def render_training_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write `report.html` (default `<run_dir>/report.html`) atomically; returns its path."""
    run_dir = Path(run_dir)
    payload = build_payload(run_dir)
    return render_report(
        "training.html.j2",
        Path(output) if output is not None else run_dir / "report.html",
        title=f"Token selection during training: {payload['run']['name']}",
        data=payload,
    )


def render_run(run_dir: str | os.PathLike, heatmap_layers=None, redraw_heatmaps: bool = False) -> list[Path]:
    """Plots + HTML report of a run directory, from disk; returns the written paths.

    `heatmap_layers` and `redraw_heatmaps` are `report.plots.render_plots`'s: with
    `redraw_heatmaps` every snapshot's heatmap is redrawn with exactly those layers."""
    from sparse_viz.report.plots import render_plots

    build_payload(run_dir)  # validates the directory before anything is written
    written = render_plots(run_dir, heatmap_layers=heatmap_layers, redraw_heatmaps=redraw_heatmaps)
    written.append(render_training_report(run_dir))
    return written


if __name__ == "__main__":  # pragma: no cover - use `python -m sparse_viz.report`
    sys.exit("use: python -m sparse_viz.report RUN_DIR")
