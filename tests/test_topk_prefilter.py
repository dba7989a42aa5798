"""The prefiltered top-k (`topk_prefilter.py`) selects exactly what a sort does: the k largest
entries of each row, the earliest among exact ties at the k-th value. Reference: Python's sort
of (-value, index) pairs, one row at a time."""

from __future__ import annotations

import pytest
import torch

from sparse_viz.model.indexer import LightningIndexer
from sparse_viz.model import ModelConfig
from sparse_viz.model.indexer_blocks import blockwise_topk
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import topk_causal
from sparse_viz.model.topk_prefilter import topk_earliest_ties_prefiltered


def sorted_reference(scores: torch.Tensor, k: int) -> list[list[int]]:
    rows = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda s: (-row[s], s))  # largest first, earliest among ties
        rows.append(sorted(order[:k]))
    return rows


def chosen(scores: torch.Tensor, k: int, **options) -> list[list[int]]:
    return [sorted(row) for row in topk_earliest_ties_prefiltered(scores, k, **options).tolist()]


def rows_of(kind: str, R: int, S: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(S)
    x = torch.randn(R, S, generator=generator)
    if kind == "relu_zeros":  # a sixth positive: the k-th value is often an exact 0 tie
        return torch.relu(x - 1.0)
    if kind == "few_values":  # ties everywhere
        return torch.randint(0, 6, (R, S), generator=generator).float()
    if kind == "causal":  # row r sees keys 0 .. S - R + r, then -inf (a block of queries)
        future = torch.arange(S)[None, :] > (S - R + torch.arange(R))[:, None]
        return x.masked_fill(future, float("-inf"))
    return x


@pytest.mark.parametrize("kind", ["normal", "relu_zeros", "few_values", "causal"])
@pytest.mark.parametrize("S, k", [(64, 4), (1000, 16), (4099, 256), (8192, 256)])  # 1000, 4099: no whole number of groups
def test_the_k_largest_earliest_among_ties_as_a_sort_finds_them(kind, S, k):
    scores = rows_of(kind, 12, S)
    assert chosen(scores, k) == sorted_reference(scores, k)


def test_a_small_group_bound_that_prunes_is_still_exact():
    """group=2 with k close to S/2: the bound keeps many entries; max_share=1 forces the
    compaction path even then."""
    scores = rows_of("relu_zeros", 8, 100)
    assert chosen(scores, 40, group=2, max_share=1.0) == sorted_reference(scores, 40)
    assert chosen(scores, 50, group=2, max_share=1.0) == sorted_reference(scores, 50)  # n == k: the bound is the least maximum


def test_rows_with_fewer_than_k_finite_entries_fall_back_and_stay_exact():
    scores = torch.full((3, 256), float("-inf"))
    scores[:, :5] = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0])
    assert chosen(scores, 8, group=16) == sorted_reference(scores, 8)


def test_blockwise_selection_at_a_length_where_the_bound_runs_equals_the_full_matrix():
    """T = 700, k = 16: blocks ending at >= 256 keys take the bound; the full-matrix top-k is the
    reference, exact ties included."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=24, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    indexer = LightningIndexer(config)
    x = torch.randn(2, 700, 24)
    cos, sin = rope_tables(4, 700, 10000.0)
    with torch.no_grad():
        full, _ = indexer(x, cos, sin)  # (B, T, T)
        q, k, w = indexer.project(x, cos, sin)
    assert (full == 0).any()
    reference = topk_causal(full, 16)
    for block_size in (64, 300):
        assert torch.equal(blockwise_topk(q, k, w, 16, block_size), reference)
        assert torch.equal(blockwise_topk(q, k, w, 16, block_size, prefilter=False), reference)
