"""Selection metrics against hand-computed tiny cases (sparse_viz.tracking.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_viz.tracking import metrics as M
from sparse_viz.tracking.token_types import TOKEN_TYPES, frequency_classes, surface_types, token_type_matrix

# One head, T=4, k=2: rows 0 and 1 are short (dense), rows 2 and 3 are informative.
DENSE = torch.tensor([[[
    [1.0, 0.0, 0.0, 0.0],
    [0.6, 0.4, 0.0, 0.0],
    [0.2, 0.3, 0.5, 0.0],
    [0.1, 0.2, 0.3, 0.4],
]]])  # (B=1, H=1, T=4, T=4)
SELECTED = torch.tensor([[[0, -1], [0, 1], [1, 2], [0, 3]]])  # (1, 4, 2)
K = 2


def test_selection_mask_ignores_pads():
    mask = M.selection_mask(SELECTED, 4)[0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_topk_selection_pads_short_rows_and_never_picks_the_future():
    scores = torch.tensor([[[5.0, 9, 9], [1, 2, 9], [3, 1, 2]]])  # future entries are large on purpose
    sel = M.topk_selection(scores, 2)[0]
    assert sel[0].tolist() == [0, -1]
    assert sorted(sel[1].tolist()) == [0, 1]
    assert sorted(sel[2].tolist()) == [0, 2]


def test_mass_at_k_hand_computed():
    mass = M.attention_mass_at_k(DENSE, SELECTED)[0]
    assert mass.tolist() == pytest.approx([1.0, 1.0, 0.8, 0.5])
    rows = M.informative_rows(4, K)
    assert rows.tolist() == [False, False, True, True]
    assert M.mean_over_rows(mass[None], rows) == pytest.approx(0.65)


def test_mass_at_k_averages_heads():
    second = torch.tensor([0.7, 0.1, 0.1, 0.1])  # head 2, row 3
    two_heads = DENSE.repeat(1, 2, 1, 1)
    two_heads[0, 1, 3] = second
    # row 3 selects {0, 3}: head 1 has 0.1 + 0.4, head 2 has 0.7 + 0.1
    assert M.attention_mass_at_k(two_heads, SELECTED)[0, 3] == pytest.approx((0.5 + 0.8) / 2)


def test_recall_at_k_hand_computed():
    recall = M.recall_at_k(DENSE, SELECTED, K)[0]
    # row 2: dense top-2 = {2, 1}, selected {1, 2} -> 1; row 3: top-2 = {3, 2}, selected {0, 3} -> 1/2
    assert recall[2:].tolist() == pytest.approx([1.0, 0.5])


def test_indexer_kl_hand_computed_and_zero_when_equal():
    p = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (1, 1, 2, 2)
    scores = torch.tensor([[[0.0, -math.inf], [0.0, math.log(3.0)]]])  # softmax row 1 = [1/4, 3/4]
    kl = M.indexer_kl(p, scores)[0]
    assert kl[0] == pytest.approx(0.0)
    assert kl[1] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    # indexer scores = log p  ->  softmax(I) = p  ->  KL = 0 (zeros of p handled as 0 log 0)
    same = DENSE[0, 0].clamp(min=1e-12).log().masked_fill(~M.causal_mask(4), -math.inf)[None]
    assert M.indexer_kl(DENSE, same).abs().max() < 1e-5


def test_jaccard_hand_computed_and_with_itself():
    other = torch.tensor([[[0, -1], [0, 1], [2, 0], [2, 3]]])
    jac = M.jaccard(SELECTED, other, 4)[0]
    assert jac.tolist() == pytest.approx([1.0, 1.0, 1 / 3, 1 / 3])
    assert torch.all(M.jaccard(SELECTED, SELECTED, 4) == 1)


def test_frequency_by_position_and_distance_hand_computed():
    pos = M.selection_frequency_by_position(SELECTED, K)
    assert pos.tolist() == pytest.approx([0.5, 0.5, 0.5, 1.0])
    dist = M.selection_frequency_by_distance(SELECTED, K)
    assert dist.tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0])


def test_sink_and_local_window_shares_hand_computed():
    assert M.sink_share(SELECTED, K) == pytest.approx(0.25)  # key 0 once among 4 selections
    assert M.local_window_share(SELECTED, K) == pytest.approx(0.75)  # t - s < 2: 1,2 and 3
    assert math.isnan(M.sink_share(SELECTED, 8))  # no informative row when T <= k


def test_keys_share_counts_short_rows_as_dense():
    assert M.keys_share(4, 2) == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)
    assert M.keys_share(4, None) == 1.0


def test_attention_entropy_uniform_and_one_hot():
    probs = torch.tensor([[[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]]])
    entropy = M.attention_entropy(probs)[0, 0]
    assert entropy.tolist() == pytest.approx([math.log(4), 0.0])


def test_index_score_statistics_use_only_visible_pairs():
    scores = torch.tensor([[[1.0, -math.inf], [3.0, 5.0]]])
    stats = M.index_score_statistics(scores, bins=4)
    assert stats["mean"] == pytest.approx(3.0)
    assert (stats["min"], stats["max"]) == (1.0, 5.0)
    assert stats["std"] == pytest.approx(2.0)  # sample std of 1, 3, 5
    assert float(stats["hist"].sum()) == 3


def test_indexer_head_specialisation_one_hot_vs_uniform_heads():
    T = 5
    visible = M.causal_mask(T).float()
    focused = torch.zeros(T, T)
    focused[:, 0] = 2.0  # head 0 puts everything on key 0
    uniform = visible.clone()  # head 1 spreads evenly over visible keys
    terms = torch.stack([focused, uniform])[None]  # (1, 2, T, T)
    out = M.indexer_head_specialisation(terms)
    assert out["specialisation"].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    total = 2.0 * T + T * (T + 1) / 2
    assert out["weight_share"].tolist() == pytest.approx([2.0 * T / total, (T * (T + 1) / 2) / total])
    varied = torch.arange(T * T, dtype=torch.float32).reshape(T, T)
    same = M.indexer_head_specialisation(torch.stack([varied, 3 * varied])[None])
    assert same["redundancy"] == pytest.approx(1.0)
    opposite = M.indexer_head_specialisation(torch.stack([varied, -varied])[None])
    assert opposite["redundancy"] == pytest.approx(-1.0)


def test_head_distance_profile_sink_head_and_previous_token_head():
    T = 8
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    previous = torch.zeros(T, T)
    previous[0, 0] = 1.0
    previous[torch.arange(1, T), torch.arange(0, T - 1)] = 1.0
    features = M.head_distance_profile(torch.stack([sink, previous])[None])  # (2, F)
    assert features[0, 0] == pytest.approx(1.0)  # all mass on key 0
    assert features[1, 0] == pytest.approx(2 / T)  # rows 0 and 1 land on key 0
    assert features[1, 2] == pytest.approx((T - 1) / T)  # distance 1 -> bucket 1 (feature 2)


def test_oracle_beats_correlated_indexer_beats_random():
    """A synthetic setup where the indexer's scores are a noisy copy of log p."""
    torch.manual_seed(0)
    B, H, T, k = 2, 3, 48, 8
    logits = torch.randn(B, H, T, T) * 2.0
    dense = logits.masked_fill(~M.causal_mask(T), -math.inf).softmax(-1)  # (B, H, T, T)
    p = dense.mean(1)
    scores = p.clamp(min=1e-12).log() + 0.5 * torch.randn(B, T, T)
    rows = M.informative_rows(T, k)
    indexer = M.mean_over_rows(M.attention_mass_at_k(dense, M.topk_selection(scores, k)), rows)
    oracle = M.mean_over_rows(M.attention_mass_at_k(dense, M.topk_selection(p, k)), rows)
    random_sel = M.topk_selection(torch.rand(B, T, T), k)
    random = M.mean_over_rows(M.attention_mass_at_k(dense, random_sel), rows)
    assert oracle >= indexer >= random
    assert oracle - random > 0.1


# ---------------------------------------------------------------------------- token types
def test_surface_types():
    assert surface_types(",") == (True, False, False, False)
    assert surface_types("\n") == (False, True, False, False)
    assert surface_types(" 1999") == (False, False, True, False)
    assert surface_types(" Romeo") == (False, False, False, True)
    assert surface_types(" the") == (False, False, False, False)


def test_frequency_classes_by_corpus_mass():
    frequent, rare = frequency_classes(np.array([50, 30, 10, 6, 4, 0]))
    assert np.flatnonzero(frequent).tolist() == [0]
    assert np.flatnonzero(rare).tolist() == [3, 4, 5]


def test_token_type_matrix_columns():
    frequent, rare = frequency_classes(np.array([50, 30, 10, 6, 4, 0]))
    matrix = token_type_matrix([" The", "!"], np.array([0, 5]), frequent, rare)
    assert matrix.shape == (2, len(TOKEN_TYPES))
    assert dict(zip(TOKEN_TYPES, matrix[0])) == {
        "punctuation": False, "whitespace": False, "digits": False, "capitalised": True,
        "frequent": True, "rare": False}
    assert matrix[1].tolist() == [True, False, False, False, False, True]
