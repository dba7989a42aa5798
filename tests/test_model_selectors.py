"""Each selector against hand-computed or brute-force selections; shared properties of all."""

import pytest
import torch

from sparse_viz.model.selectors import select_keys

NEEDS_DATA = {"topk", "oracle"}


def as_rows(selected: torch.Tensor) -> list[list[int]]:
    return selected[0].tolist()


def select(name, T, top_k, *, seed=0, batch_size=1, sink_tokens=4):
    g = torch.Generator().manual_seed(seed + 100)
    return select_keys(
        name, top_k=top_k, seq_len=T,
        index_scores=torch.randn(batch_size, T, T, generator=g),
        dense_probs=torch.rand(batch_size, 3, T, T, generator=g),
        sink_tokens=sink_tokens, seed=seed, batch_size=batch_size,
    )


def test_local_keeps_the_last_k_keys():
    assert as_rows(select_keys("local", top_k=3, seq_len=5)) == [
        [0, -1, -1], [0, 1, -1], [0, 1, 2], [1, 2, 3], [2, 3, 4],
    ]


def test_sink_local_keeps_the_first_sinks_and_the_last_keys():
    assert as_rows(select_keys("sink_local", top_k=4, seq_len=7, sink_tokens=1)) == [
        [0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3],
        [0, 2, 3, 4], [0, 3, 4, 5], [0, 4, 5, 6],
    ]
    assert as_rows(select_keys("sink_local", top_k=4, seq_len=6, sink_tokens=2))[5] == [0, 1, 4, 5]


def test_topk_keeps_the_highest_past_scores_and_never_a_future_one():
    inf = float("inf")
    scores = torch.tensor([[
        [0.0, 9.0, 9.0, 9.0],   # future entries are high but must be ignored
        [5.0, 1.0, 9.0, 9.0],
        [1.0, 3.0, 2.0, 9.0],
        [4.0, -inf, 0.5, 3.0],
    ]])
    assert as_rows(select_keys("topk", top_k=2, seq_len=4, index_scores=scores)) == [
        [0, -1], [0, 1], [1, 2], [0, 3],
    ]


def test_oracle_is_the_argsort_of_head_summed_probabilities():
    g = torch.Generator().manual_seed(5)
    T, k = 9, 3
    probs = torch.rand(2, 4, T, T, generator=g).tril()  # (B, H, T, T), zero in the future
    selected = select_keys("oracle", top_k=k, seq_len=T, dense_probs=probs)
    for b in range(2):
        for t in range(T):
            summed = [sum(probs[b, h, t, s].item() for h in range(4)) for s in range(t + 1)]
            best = sorted(range(t + 1), key=lambda s: -summed[s])[:k]
            expected = sorted(best) + [-1] * (k - len(best))
            assert selected[b, t].tolist() == expected


def test_random_is_seeded_causal_and_without_repeats():
    T, k = 20, 5
    first = select_keys("random", top_k=k, seq_len=T, seed=7, batch_size=2)
    again = select_keys("random", top_k=k, seq_len=T, seed=7, batch_size=2)
    other = select_keys("random", top_k=k, seq_len=T, seed=8, batch_size=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for b in range(2):
        for t in range(k, T):
            row = first[b, t].tolist()
            assert len(set(row)) == k and all(0 <= s <= t for s in row)


def test_random_covers_the_past_uniformly():
    """Over many seeds every past key of a row is picked with probability k / (t + 1)."""
    T, k, t = 10, 3, 9
    counts = torch.zeros(T)
    draws = 600
    for seed in range(draws):
        row = select_keys("random", top_k=k, seq_len=T, seed=seed)[0, t]
        counts[row] += 1
    frequency = counts / draws
    assert (frequency - k / (t + 1)).abs().max() < 0.08


@pytest.mark.parametrize("name", ["topk", "local", "sink_local", "random", "oracle"])
@pytest.mark.parametrize("T,top_k", [(12, 4), (6, 6), (5, 9)])
def test_every_selector_is_causal_sorted_and_dense_on_short_rows(name, T, top_k):
    selected = select(name, T, top_k, batch_size=2, sink_tokens=1)
    k = min(top_k, T)
    assert selected.shape == (2, T, k) and selected.dtype == torch.long
    for b in range(2):
        for t in range(T):
            row = selected[b, t].tolist()
            valid = [s for s in row if s >= 0]
            assert row == valid + [-1] * (k - len(valid))  # valid first, ascending, then -1
            assert valid == sorted(set(valid)) and all(s <= t for s in valid)
            if t + 1 <= top_k:
                assert valid == list(range(t + 1))
            else:
                assert len(valid) == k


def test_dense_selects_nothing_to_drop():
    assert select_keys("dense", top_k=4, seq_len=8) is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="bogus", top_k=4, seq_len=8), "unknown selector"),
    (dict(name="local", top_k=0, seq_len=8), "top_k must be > 0"),
    (dict(name="topk", top_k=2, seq_len=8), "needs index_scores"),
    (dict(name="oracle", top_k=2, seq_len=8), "needs dense_probs"),
    (dict(name="sink_local", top_k=2, seq_len=8, sink_tokens=2), "sink_tokens"),
])
def test_bad_selector_arguments_raise_a_clear_value_error(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        select_keys(name, **kwargs)
