"""analyse_probe on a tiny real SparseTransformer, and `write_synthetic_run`, the run directory
that the plot and report tests render (imported by them from this module)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.selectors import select_keys
from sparse_viz.tracking import metrics as M
from sparse_viz.tracking.callback import BASELINES, analyse_probe, snapshot_record
from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import frequency_classes, token_type_matrix

XSS_TOKEN = "</script><img src=x onerror=alert(1)>"


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, top_k=6,
                  indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)
    fields.update(overrides)
    return ModelConfig(**fields)


def baselines_for(traces, cfg: ModelConfig, k: int, T: int, P: int) -> dict[str, list[torch.Tensor]]:
    return {name: [select_keys(name, top_k=k, seq_len=T, index_scores=tr.index_scores,
                               dense_probs=tr.dense_attn_probs, sink_tokens=min(cfg.sink_tokens, k - 1),
                               seed=0, batch_size=P) for tr in traces] for name in BASELINES}


def write_synthetic_run(run_dir: Path, *, n_snapshots: int = 4, seq_len: int = 24, probe_rows: int = 2,
                        tokens: list[str] | None = None, every: int = 10, n_layers: int = 2) -> Path:
    """A run directory written the way the callback writes it, from a tiny random model whose
    weights drift between snapshots (dense stage first, sparse stage after)."""
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=n_layers)
    model = SparseTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (probe_rows, seq_len))
    words = tokens or [f" w{i}" if i % 5 else "," for i in range(cfg.vocab_size)]
    strings = [[words[int(i) % len(words)] if tokens is None else tokens[j % len(tokens)]
                for j, i in enumerate(row)] for row in ids]
    frequent, rare = frequency_classes(np.bincount(ids.reshape(-1).numpy(), minlength=cfg.vocab_size))
    types = torch.as_tensor(np.stack([token_type_matrix(s, row.numpy(), frequent, rare) for s, row in zip(strings, ids)]))
    lookup = {int(i): s for row_s, row in zip(strings, ids) for s, i in zip(row_s, row.tolist())}
    store = RunStore(run_dir)
    k = min(cfg.top_k, seq_len)
    store.write_probe({"token_ids": ids[0].tolist(), "tokens": strings[0], "probe_rows": probe_rows,
                       "seq_len": seq_len, "top_k": k, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                       "selector": cfg.selector, "every_n_steps": every, "token_types": [],
                       "run_name": Path(run_dir).name})
    previous = None
    for i in range(n_snapshots):
        attention = "dense" if i < n_snapshots // 2 else "sparse"
        with torch.no_grad():
            traces = model(ids, attention=attention, trace="full").traces
            scalars, arrays, selected = analyse_probe(
                traces, k, token_types=types, token_ids=ids, previous_selected=previous,
                baselines=baselines_for(traces, cfg, k, seq_len, probe_rows), attention=attention)
            for p in model.parameters():  # drift, so that snapshots differ
                p.add_(0.05 * torch.randn_like(p))
        previous = selected
        record = snapshot_record(i * every, scalars, arrays, stage="dense" if attention == "dense" else "sparse",
                                 attention=attention, selected_by_attention=attention == "sparse",
                                 token_lookup=lookup, val_loss=4.0 - 0.3 * i, tokens_per_s=1000.0 + i)
        store.append(record, arrays)
    return Path(run_dir)


@pytest.fixture(scope="module")
def tiny_traces():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SparseTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        return cfg, ids, model(ids, attention="sparse", trace="full").traces


def test_analyse_probe_mass_matches_a_naive_loop(tiny_traces):
    cfg, ids, traces = tiny_traces
    k = cfg.top_k
    scalars, arrays, selected = analyse_probe(traces, k, attention="sparse")
    for layer, trace in enumerate(traces):
        dense = trace.dense_attn_probs  # (B, H, T, T)
        B, H, T, _ = dense.shape
        total, count = 0.0, 0
        for b in range(B):
            for t in range(k, T):  # informative rows t + 1 > k
                keys = [int(s) for s in trace.selected[b, t] if s >= 0]
                total += sum(float(dense[b, h, t, s]) for h in range(H) for s in keys) / H
                count += 1
        assert scalars[f"L{layer}/mass_at_k"] == pytest.approx(total / count, rel=1e-5)
    assert torch.equal(selected[0], traces[0].selected.long())
    assert arrays["show_selected"].shape == (cfg.n_layers, 20, k)


def test_oracle_mass_is_the_maximum_and_random_is_below_it(tiny_traces):
    cfg, ids, traces = tiny_traces
    k = cfg.top_k
    scalars, _, _ = analyse_probe(traces, k, baselines=baselines_for(traces, cfg, k, 20, 2), attention="sparse")
    for layer in range(cfg.n_layers):
        oracle = scalars[f"L{layer}/mass_at_k_oracle"]
        for name in ("mass_at_k", "mass_at_k_random", "mass_at_k_local", "mass_at_k_sink_local"):
            assert scalars[f"L{layer}/{name}"] <= oracle + 1e-6


def test_jaccard_with_itself_is_one(tiny_traces):
    cfg, ids, traces = tiny_traces
    _, _, selected = analyse_probe(traces, cfg.top_k, attention="sparse")
    scalars, _, _ = analyse_probe(traces, cfg.top_k, previous_selected=selected, attention="sparse")
    assert scalars["jaccard_prev"] == pytest.approx(1.0)


def test_dense_stage_uses_the_indexers_would_be_selection(tiny_traces):
    cfg, ids, _ = tiny_traces
    torch.manual_seed(0)
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        traces = model(ids, attention="dense", trace="full").traces
    _, arrays, selected = analyse_probe(traces, cfg.top_k, attention="dense")
    expected = M.topk_selection(traces[0].index_scores, cfg.top_k)
    assert torch.equal(selected[0], expected)
    assert arrays["show_attn"].shape == arrays["show_dense"].shape


def test_synthetic_run_has_one_line_and_one_npz_per_snapshot(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_snapshots=3)
    store = RunStore(run)
    assert store.steps() == [0, 10, 20]
    assert all(store.snapshot_path(s).is_file() for s in (0, 10, 20))
    history = store.read_history()
    assert history[0]["stage"] == "dense" and history[-1]["selection_source"] == "attention"
    assert "jaccard_prev" not in history[0] or history[0]["jaccard_prev"] is None
    assert 0.0 <= history[1]["jaccard_prev"] <= 1.0
    assert math.isfinite(history[-1]["mass_at_k_oracle"])
