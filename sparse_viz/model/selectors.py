"""Which keys each query attends to: top-k over index scores, and the baselines.

Every selector returns a LongTensor (B, T, k), k = min(top_k, T), with the selected key indices
of each query in ascending order and -1 in the slots a short row cannot fill. Causality holds by
construction: every valid entry s of row t satisfies s <= t, and rows with t + 1 <= top_k hold
exactly 0..t (short rows are dense). `dense` selects everything and returns None.

These are pure functions of their arguments (no module state), so the tracking code can compute
a baseline's selection on any probe batch.
"""

from __future__ import annotations

import torch

from .config import SELECTORS


def causal_future_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool, True where the key is in the query's future (s > t)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def canonical_selection(selected: torch.Tensor, seq_len: int, first_row: int = 0) -> torch.Tensor:
    """Invalidate future slots and sort: valid indices ascending, then the -1 slots.

    Args:
        selected: (B, R, k) long, rows first_row .. first_row + R - 1 of a (B, T, k) selection
            (all of it by default); entries s > t or s < 0 count as unfilled.
        seq_len: T.
        first_row: position t of the first row.

    Returns:
        (B, R, k) long.
    """
    rows = selected.shape[1]
    t = torch.arange(first_row, first_row + rows, device=selected.device)[None, :, None]  # (1, R, 1)
    invalid = (selected > t) | (selected < 0)
    # Sort with the unfilled slots pushed past every real index, then mark them -1 again.
    ordered = torch.where(invalid, seq_len, selected).sort(dim=-1).values  # (B, T, k)
    return ordered.masked_fill(ordered == seq_len, -1)


def dense_short_rows(selected: torch.Tensor, top_k: int) -> torch.Tensor:
    """Overwrite rows with t + 1 <= top_k by 0..t (then -1): short rows are dense.

    Top-k over a causally masked row would already do this when the past scores are finite;
    writing it out keeps the property even for -inf or tied past scores.

    Args:
        selected: (B, T, k) long.
        top_k: the requested k (k = min(top_k, T)).

    Returns:
        (B, T, k) long.
    """
    _, T, k = selected.shape
    t = torch.arange(T, device=selected.device)[:, None]  # (T, 1)
    slot = torch.arange(k, device=selected.device)[None, :]  # (1, k)
    everything_past = torch.where(slot <= t, slot, -1)  # (T, k)
    short = (t + 1 <= top_k)[None]  # (1, T, 1)
    return torch.where(short, everything_past[None], selected)


def topk_earliest_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of each row; among entries tied at the k-th largest
    value, the earliest (lowest index) are kept.

    `torch.topk` alone picks among tied values by an order that depends on the row's length and
    the device, so the same scores would select differently when computed by query blocks, for a
    prefix of the sequence, or on a GPU. Ties are common in index scores (ReLU makes every score
    of a key 0 when all its head products are negative); this rule makes the selection a function
    of the scores only. Rows without a tie at the k-th value (the usual case) cost one extra
    comparison pass; tied rows are redone by rank.

    Args:
        scores: (..., S) float.
        k: 1 <= k <= S.

    Returns:
        (..., k) long indices (in no particular order).
    """
    values, indices = scores.topk(k, dim=-1)  # (..., k)
    kth = values[..., -1:]  # (..., 1) the k-th largest value of each row
    tied = (scores >= kth).sum(dim=-1) > k  # (...,) rows where a key equal to kth was left out
    if tied.any():
        indices[tied] = earliest_k_from(scores[tied], kth[tied], k)
    return indices


def earliest_k_from(rows: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Given each row's k-th largest value, its k largest entries, earliest among ties at it.

    Args:
        rows: (r, S) float.
        kth: (r, 1) the k-th largest value of each row.
        k: entries per row.

    Returns:
        (r, k) long indices, ascending.
    """
    above, at = rows > kth, rows == kth  # (r, S) each
    wanted = k - above.sum(dim=-1, keepdim=True)  # (r, 1) tied entries to keep
    keep = above | (at & (at.cumsum(dim=-1) <= wanted))  # (r, S) exactly k per row
    return keep.nonzero()[:, -1].view(-1, k)  # nonzero is row-major: k per row in order


def topk_causal(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k keys of each row among s <= t.

    The causal mask is applied before top-k and again after it (through `canonical_selection`):
    top-k of a row with fewer than k past keys also returns future slots, and forgetting to
    drop them leaks the future (REFERENCE §1). Exact ties at the k-th score keep the earliest
    keys (`topk_earliest_ties`).

    Args:
        scores: (B, T, T) float; higher is better. Future entries are ignored.
        top_k: keys per query.

    Returns:
        (B, T, min(top_k, T)) long.
    """
    T = scores.shape[-1]
    k = min(top_k, T)
    masked = scores.detach().masked_fill(causal_future_mask(T, scores.device), float("-inf"))
    selected = topk_earliest_ties(masked, k)  # (B, T, k)
    return canonical_selection(dense_short_rows(selected, top_k), T)


def local_window(batch_size: int, seq_len: int, top_k: int, device=None) -> torch.Tensor:
    """The last k keys of each row: t-k+1 .. t (negative slots unfilled)."""
    k = min(top_k, seq_len)
    t = torch.arange(seq_len, device=device)[:, None]  # (T, 1)
    window = t - k + 1 + torch.arange(k, device=device)[None, :]  # (T, k)
    selected = window.masked_fill(window < 0, -1).expand(batch_size, seq_len, k)
    return canonical_selection(selected, seq_len)


def sink_plus_local(batch_size: int, seq_len: int, top_k: int, sink_tokens: int, device=None) -> torch.Tensor:
    """The first `sink_tokens` keys plus the last top_k - sink_tokens; short rows dense."""
    k = min(top_k, seq_len)
    local = top_k - sink_tokens
    t = torch.arange(seq_len, device=device)[:, None]  # (T, 1)
    sinks = torch.arange(sink_tokens, device=device)[None, :].expand(seq_len, sink_tokens)  # (T, s)
    window = t - local + 1 + torch.arange(local, device=device)[None, :]  # (T, k - s)
    selected = torch.cat((sinks, window), dim=-1)[:, :k]  # (T, k) when T >= top_k
    selected = selected.expand(batch_size, seq_len, k)
    return canonical_selection(dense_short_rows(selected, top_k), seq_len)


def random_past(batch_size: int, seq_len: int, top_k: int, seed: int, device=None) -> torch.Tensor:
    """k keys drawn uniformly without replacement among s <= t; same seed, same selection."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Top-k of i.i.d. uniform scores is a uniform k-subset of the causal row.
    scores = torch.rand(batch_size, seq_len, seq_len, generator=generator)  # (B, T, T)
    return topk_causal(scores.to(device), top_k)


def select_keys(
    name: str,
    *,
    top_k: int,
    seq_len: int,
    index_scores: torch.Tensor | None = None,
    dense_probs: torch.Tensor | None = None,
    sink_tokens: int = 4,
    seed: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """The keys each query attends to under selector `name`.

    Args:
        name: one of topk, dense, local, sink_local, random, oracle.
        top_k: keys per query (> 0).
        seq_len: T.
        index_scores: (B, T, T) Lightning Indexer scores; required by `topk`.
        dense_probs: (B, H, T, T) dense causal attention probabilities; required by `oracle`,
            which keeps the top-k of their sum over heads.
        sink_tokens: first keys always kept by `sink_local`.
        seed: seed of `random`.
        batch_size: B, for the selectors that do not look at the data.
        device: where the result lives, for the selectors that do not look at the data.

    Returns:
        (B, T, min(top_k, T)) long, or None for `dense`.
    """
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}")
    if top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if name == "dense":
        return None
    if name == "topk":
        if index_scores is None:
            raise ValueError("selector 'topk' needs index_scores (B, T, T)")
        if index_scores.shape[-2:] != (seq_len, seq_len):
            raise ValueError(f"index_scores has shape {tuple(index_scores.shape)}, expected (B, {seq_len}, {seq_len})")
        return topk_causal(index_scores, top_k)
    if name == "oracle":
        if dense_probs is None:
            raise ValueError("selector 'oracle' needs dense_probs (B, H, T, T)")
        if dense_probs.dim() != 4 or dense_probs.shape[-2:] != (seq_len, seq_len):
            raise ValueError(f"dense_probs has shape {tuple(dense_probs.shape)}, expected (B, H, {seq_len}, {seq_len})")
        return topk_causal(dense_probs.sum(1), top_k)
    if name == "local":
        return local_window(batch_size, seq_len, top_k, device)
    if name == "sink_local":
        if not 0 <= sink_tokens < top_k:
            raise ValueError(f"sink_local needs 0 <= sink_tokens < top_k, got sink_tokens={sink_tokens}, top_k={top_k}")
        return sink_plus_local(batch_size, seq_len, top_k, sink_tokens, device)
    return random_past(batch_size, seq_len, top_k, seed, device)
