"""Selection metrics against hand-computed tiny cases (sparse_viz.tracking.metrics)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import selection_reference as ref
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


# ---------------------------------------------------------------------------- against brute-force loops
# Random inputs (no ties, several probe rows and heads, T not a power of two), compared with the
# loops of `selection_reference.py`, which share no code with the library. The hand-computed
# cases above use one probe row and one head: a metric that confuses the batch or head axis, or
# sums over the wrong one, passes them and fails here.
B, H, T_RANDOM, K_RANDOM = 2, 3, 11, 4


def random_dense(seed: int, batch: int = B, heads: int = H, seq_len: int = T_RANDOM) -> torch.Tensor:
    """(B, H, T, T) causal attention probabilities, rows of distinct values."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, seq_len, seq_len, generator=generator) * 2
    return logits.masked_fill(~torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), -math.inf).softmax(-1)


def random_selection(seed: int, k: int = K_RANDOM, batch: int = B, seq_len: int = T_RANDOM,
                     fewer: bool = False) -> torch.Tensor:
    """(B, T, k) random distinct visible keys per query, -1 pads; `fewer` leaves some slots of
    informative rows empty too (a selector may use fewer than k keys)."""
    rng = random.Random(seed)
    out = torch.full((batch, seq_len, k), -1, dtype=torch.long)
    for b in range(batch):
        for t in range(seq_len):
            n = min(k, t + 1)
            if fewer and t + 1 > k:
                n = rng.randint(1, k)
            keys = rng.sample(range(t + 1), n)
            out[b, t, : len(keys)] = torch.tensor(keys)
    return out


def test_selection_mask_marks_exactly_the_selected_keys():
    sel = random_selection(1, fewer=True)
    mask = M.selection_mask(sel, T_RANDOM)
    for b in range(B):
        for t in range(T_RANDOM):
            expected = ref.keys_of(sel[b, t].tolist())
            assert {s for s in range(T_RANDOM) if mask[b, t, s]} == expected


def test_topk_selection_is_the_k_largest_visible_scores():
    scores = torch.randn(B, T_RANDOM, T_RANDOM, generator=torch.Generator().manual_seed(2))
    sel = M.topk_selection(scores, K_RANDOM)
    for b in range(B):
        for t in range(T_RANDOM):
            ranked = sorted(range(t + 1), key=lambda s: -float(scores[b, t, s]))
            assert ref.keys_of(sel[b, t].tolist()) == set(ranked[:K_RANDOM])
            assert (sel[b, t] < 0).sum() == max(K_RANDOM - (t + 1), 0)


def test_mass_and_recall_at_k_match_loops_over_queries_heads_and_probe_rows():
    dense, sel = random_dense(3), random_selection(4, fewer=True)
    probs, rows = dense.tolist(), sel.tolist()
    mass = M.attention_mass_at_k(dense, sel)
    recall = M.recall_at_k(dense, sel, K_RANDOM)
    for b in range(B):
        for t in range(T_RANDOM):
            assert float(mass[b, t]) == pytest.approx(ref.mass_at_k(probs, rows, b, t), abs=1e-6)
            assert float(recall[b, t]) == pytest.approx(ref.recall_at_k(probs, rows, b, t, K_RANDOM))


def test_jaccard_matches_set_arithmetic_for_selections_of_different_sizes():
    a, c = random_selection(5, fewer=True), random_selection(6, k=6)
    jac = M.jaccard(a, c, T_RANDOM)
    for b in range(B):
        for t in range(T_RANDOM):
            assert float(jac[b, t]) == pytest.approx(ref.jaccard(a.tolist(), c.tolist(), b, t))
    empty = torch.full((1, 3, 2), -1)
    assert M.jaccard(empty, empty, 3).tolist() == [[1.0, 1.0, 1.0]]  # both empty: nothing changed


def test_selection_frequencies_match_counting_loops_over_probe_rows():
    sel = random_selection(7, fewer=True)
    for got, expected in ((M.selection_frequency_by_position(sel, K_RANDOM), ref.frequency_by_position(sel.tolist(), K_RANDOM)),
                          (M.selection_frequency_by_distance(sel, K_RANDOM), ref.frequency_by_distance(sel.tolist(), K_RANDOM))):
        assert got.shape == (T_RANDOM,)
        assert got.tolist() == pytest.approx(expected, nan_ok=True)


def test_sink_and_local_window_shares_match_counting_loops():
    sel = random_selection(8, fewer=True)
    rows = sel.tolist()
    assert M.sink_share(sel, K_RANDOM) == pytest.approx(ref.sink_share(rows, K_RANDOM))
    for window in (None, 1, 2, 3, 6):
        expected = ref.local_share(rows, K_RANDOM, K_RANDOM if window is None else window)
        assert M.local_window_share(sel, K_RANDOM, window) == pytest.approx(expected)


def test_indexer_kl_matches_a_loop_and_ignores_future_scores():
    dense = random_dense(9)
    # finite, large scores in the future: only s <= t may enter the softmax
    scores = torch.randn(B, T_RANDOM, T_RANDOM, generator=torch.Generator().manual_seed(10)) * 3
    scores = scores + 20 * torch.ones(T_RANDOM, T_RANDOM).triu(1)
    kl = M.indexer_kl(dense, scores)
    for b in range(B):
        for t in range(T_RANDOM):
            assert float(kl[b, t]) == pytest.approx(ref.indexer_kl(dense.tolist(), scores.tolist(), b, t), abs=1e-5)


def test_attention_entropy_matches_a_loop_over_rows():
    dense = random_dense(11)
    entropy = M.attention_entropy(dense)
    assert entropy.shape == (B, H, T_RANDOM)
    probs = dense.tolist()
    for b in range(B):
        for h in range(H):
            for t in range(T_RANDOM):
                assert float(entropy[b, h, t]) == pytest.approx(ref.entropy(probs[b][h][t]), abs=1e-5)


def test_index_score_statistics_match_a_loop_including_every_histogram_bin():
    scores = torch.randn(B, T_RANDOM, T_RANDOM, generator=torch.Generator().manual_seed(12))
    scores = scores.masked_fill(~M.causal_mask(T_RANDOM), -math.inf)
    stats = M.index_score_statistics(scores, bins=7)
    expected = ref.score_statistics(scores.tolist(), bins=7)
    for key in ("mean", "std", "min", "max"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-6)
    assert stats["hist"].tolist() == expected["hist"]
    assert stats["edges"].tolist() == pytest.approx(expected["edges"], rel=1e-6)


def test_indexer_head_specialisation_matches_a_loop_with_signed_terms():
    # Signed terms (the weights w[t, j] may be negative): shares use magnitudes, the
    # correlation the signed values; some rows of head 2 are all zero (it contributes nothing).
    terms = torch.randn(B, 3, T_RANDOM, T_RANDOM, generator=torch.Generator().manual_seed(13))
    terms[:, 2, 3:6] = 0.0
    out = M.indexer_head_specialisation(terms)
    expected = ref.head_specialisation(terms.tolist())
    assert out["weight_share"].tolist() == pytest.approx(expected["weight_share"], rel=1e-5)
    assert out["specialisation"].tolist() == pytest.approx(expected["specialisation"], rel=1e-4)
    assert out["redundancy"] == pytest.approx(expected["redundancy"], abs=1e-5)


@pytest.mark.parametrize("n_buckets", [None, 2])
def test_head_distance_profile_matches_a_loop_in_every_feature(n_buckets):
    dense = random_dense(14)
    features = M.head_distance_profile(dense, n_buckets)
    buckets = n_buckets or int(math.log2(T_RANDOM)) + 1  # the default: floor(log2 T) + 1
    expected = ref.head_distance_profile(dense.tolist(), buckets)
    assert features.shape == (H, buckets + 2)
    np.testing.assert_allclose(features.numpy(), np.array(expected), atol=1e-6)
    # every row of probabilities sums to 1, and so does the mass over the distance buckets
    assert features[:, 1:-1].sum(-1).tolist() == pytest.approx([1.0] * H, abs=1e-5)


def test_head_distance_profile_entropy_feature_is_normalised_by_log_t():
    """A uniform causal head: mean_t log(t + 1) / log T, hand-computed for T = 4."""
    T = 4
    uniform = M.causal_mask(T).float()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    features = M.head_distance_profile(uniform[None, None])
    assert features[0, -1] == pytest.approx((math.log(2) + math.log(3) + math.log(4)) / 4 / math.log(4))


def test_frequency_classes_match_a_loop_over_ids_sorted_by_count():
    """frequent: walking the ids from the most common down, an id is frequent while the ids
    before it cover less than frequent_mass; rare: walking up from the least common, ids are
    rare while the running share stays <= rare_mass (frequent ids never count as rare)."""
    rng = random.Random(15)
    counts = [v ** 2 for v in rng.sample(range(40), 30)]  # distinct: the order of ties is not specified
    total = sum(counts)
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    expected_frequent, covered = set(), 0
    for i in order:
        if covered / total < 0.5:
            expected_frequent.add(i)
        covered += counts[i]
    expected_rare, running = set(), 0
    for i in reversed(order):
        running += counts[i]
        if running / total <= 0.1:
            expected_rare.add(i)
    expected_rare -= expected_frequent
    frequent, rare = frequency_classes(np.array(counts))
    assert set(np.flatnonzero(frequent).tolist()) == expected_frequent
    assert set(np.flatnonzero(rare).tolist()) == expected_rare
    assert expected_frequent and expected_rare


def test_token_type_matrix_marks_ids_the_counts_do_not_cover_as_rare():
    frequent, rare = frequency_classes(np.array([50, 30, 10, 6, 4, 0]))
    matrix = token_type_matrix(["a", "b"], np.array([0, 9]), frequent, rare)  # id 9 was never counted
    assert matrix[1].tolist() == [False, False, False, False, False, True]
    # without corpus counts, neither frequency column is set
    assert not token_type_matrix(["a"], np.array([0]), None, None)[:, 4:].any()
