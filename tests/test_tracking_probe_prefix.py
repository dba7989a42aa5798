"""The tracking callback's bounded probe at long T (`probe_seq_len`): probing a prefix stores
exactly what the full-length forward computes at those positions, and the run says what it probed;
the tracked would-be selection follows the model's tie rule, so it does not depend on T either."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.selectors import topk_causal
from sparse_viz.tracking import metrics as M
from sparse_viz.tracking.callback import SelectionAnalysisCallback
from sparse_viz.train import run_training

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml")


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_a_prefix_probe_equals_the_full_forward_at_its_positions(attention):
    """What the callback records on ids[:, :N] == the full forward's traces read at rows and keys < N."""
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=64,
                                          top_k=6, indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)).eval()
    ids = torch.randint(0, 40, (2, 50))
    N = 23
    with torch.no_grad():
        full = model(ids, attention=attention, trace="full").traces
        prefix = model(ids[:, :N], attention=attention, trace="full").traces
    for whole, part in zip(full, prefix):
        if attention == "sparse":  # exact: ties at the k-th score keep the earliest keys at any length
            assert torch.equal(part.selected, whole.selected[:, :N])
        else:
            assert part.selected is None and whole.selected is None
        for name in ("index_scores", "index_head_terms", "attn_probs", "dense_attn_probs"):
            got, want = getattr(part, name), getattr(whole, name)
            torch.testing.assert_close(got, want[..., :N, :N], rtol=1e-5, atol=1e-6, msg=name)


def test_the_tracked_would_be_selection_is_the_models_selection_ties_included():
    """Scores full of exact ties (integers 0..2): the tracking's top-k == the model's top-k, as sets."""
    scores = torch.randint(0, 3, (2, 30, 30), generator=torch.Generator().manual_seed(0)).float()

    def as_sets(selection):
        return [[sorted(s for s in row if s >= 0) for row in batch] for batch in selection.tolist()]

    for k in (1, 4, 9):
        assert as_sets(M.topk_selection(scores, k)) == as_sets(topk_causal(scores, k))


def test_probe_seq_len_must_be_positive():
    with pytest.raises(ValueError, match="probe_seq_len"):
        SelectionAnalysisCallback(probe_seq_len=0)


@pytest.mark.slow
def test_a_run_with_a_probe_prefix_stores_arrays_of_that_length_and_says_so(tmp_path):
    """tiny.yaml (T = 64) probed on its first 24 positions: probe.json and every snapshot agree (11-21 s)."""
    root = tmp_path / "runs"
    run_training([
        "--config", TINY, "--run_root", str(root), "--run_name", "p", f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks.probe_seq_len=24",
        "--trainer.callbacks.every_n_steps=10",
        "--model.stages=[{name: dense, steps: 4}, {name: warmup, steps: 3}, {name: sparse, steps: 4}]",
    ])
    probe = json.loads((root / "p" / "analysis" / "probe.json").read_text())
    assert (probe["seq_len"], probe["probe_seq_len"], probe["train_seq_len"]) == (24, 24, 64)
    assert len(probe["tokens"]) == 24
    snapshots = sorted((root / "p" / "analysis").glob("step_*.npz"))
    assert len(snapshots) >= 2
    for path in snapshots:
        with np.load(path) as arrays:
            assert arrays["selected"].shape[2] == 24  # (L, P, T, k)
            assert arrays["show_mass"].shape[-1] == 24
