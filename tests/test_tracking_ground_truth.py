"""Ground-truth hit@k and attention mass (sparse_viz.tracking.ground_truth) against brute-force
loops over positions."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_viz.model.selectors import select_keys
from sparse_viz.model.trace import AttentionTrace
from sparse_viz.tracking import ground_truth as GT


def random_case(seed: int, B=3, H=2, T=24, k=5, answers=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, T, T, generator=g).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    probs = logits.softmax(-1)  # (B, H, T, T)
    selected = select_keys("random", top_k=k, seq_len=T, seed=seed, batch_size=B)  # (B, T, k)
    gt = torch.full((B, T, 2), -1, dtype=torch.long)
    for b in range(B):
        rows = torch.randperm(T - 3, generator=g)[:answers] + 3
        for t in rows.tolist():
            key = int(torch.randint(0, t - 1, (1,), generator=g))
            gt[b, t] = torch.tensor([key, key + 1])
    return probs, selected, gt


def brute_hit(selected, gt, column):
    hits, count = 0, 0
    for b in range(gt.shape[0]):
        for t in range(gt.shape[1]):
            if (gt[b, t] >= 0).any():
                count += 1
                hits += int(gt[b, t, column].item() in selected[b, t].tolist())
    return hits / count


def brute_mass(probs, gt, columns):
    total, count = 0.0, 0
    for b in range(gt.shape[0]):
        for t in range(gt.shape[1]):
            if (gt[b, t] >= 0).any():
                count += 1
                for column in columns:
                    s = gt[b, t, column].item()
                    total += sum(probs[b, h, t, s].item() for h in range(probs.shape[1])) / probs.shape[1]
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hit_at_k_and_ground_truth_mass_match_a_loop_over_positions(seed):
    probs, selected, gt = random_case(seed)
    answers = GT.answer_rows(gt)
    hits = GT.ground_truth_hits(selected, gt)
    assert GT.mean_over_answers(hits[..., GT.VALUE], answers) == pytest.approx(brute_hit(selected, gt, 1))
    assert GT.mean_over_answers(hits[..., GT.KEY], answers) == pytest.approx(brute_hit(selected, gt, 0))
    mass = GT.ground_truth_mass(probs, gt)
    assert GT.mean_over_answers(mass[..., GT.VALUE], answers) == pytest.approx(brute_mass(probs, gt, [1]), rel=1e-5)
    assert GT.mean_over_answers(mass.sum(-1), answers) == pytest.approx(brute_mass(probs, gt, [0, 1]), rel=1e-5)


def test_scalars_per_layer_cover_the_selection_the_baselines_and_the_layer_mean():
    layers = [random_case(seed) for seed in (5, 6)]
    gt = layers[0][2]
    traces = [AttentionTrace(selected=sel, attn_probs=probs, dense_attn_probs=probs) for probs, sel, _ in layers]
    local = [select_keys("local", top_k=5, seq_len=24, batch_size=3) for _ in layers]
    scalars = GT.ground_truth_scalars(traces, gt, [sel for _, sel, _ in layers], {"local": local})
    for layer, (probs, sel, _) in enumerate(layers):
        assert scalars[f"L{layer}/gt_hit_at_k"] == pytest.approx(brute_hit(sel, gt, 1))
        assert scalars[f"L{layer}/gt_hit_at_k_local"] == pytest.approx(brute_hit(local[layer], gt, 1))
        assert scalars[f"L{layer}/gt_mass"] == pytest.approx(brute_mass(probs, gt, [1]), rel=1e-5)
    assert scalars["gt_hit_at_k"] == pytest.approx((scalars["L0/gt_hit_at_k"] + scalars["L1/gt_hit_at_k"]) / 2)


def test_an_oracle_on_attention_that_looks_at_the_value_always_hits_and_local_misses_far_keys():
    B, H, T, k = 2, 2, 40, 4
    gt = torch.full((B, T, 2), -1, dtype=torch.long)
    probs = torch.zeros(B, H, T, T)
    probs[..., 0] = 1.0  # every row on the sink
    for t in (30, 34, 38):
        gt[:, t] = torch.tensor([2, 3])
        probs[:, :, t, 0], probs[:, :, t, 3] = 0.1, 0.9
    oracle = select_keys("oracle", top_k=k, seq_len=T, dense_probs=probs)
    local = select_keys("local", top_k=k, seq_len=T, batch_size=B)
    answers = GT.answer_rows(gt)
    assert GT.mean_over_answers(GT.ground_truth_hits(oracle, gt)[..., 1], answers) == 1.0
    assert GT.mean_over_answers(GT.ground_truth_hits(local, gt)[..., 1], answers) == 0.0
    assert GT.mean_over_answers(GT.ground_truth_mass(probs, gt)[..., 1], answers) == pytest.approx(0.9)
