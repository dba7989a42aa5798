"""Selection and attention metrics: pure functions on tensors, no files, no Lightning.

Shapes: B batch (probe rows), H main heads, H_I indexer heads, T sequence, k = slots per query.
A selection is a (B, T, k) long tensor of key indices with -1 in the slots a short row cannot
fill (the `AttentionTrace.selected` convention).

Informative rows. A query t sees t + 1 keys; when t + 1 <= k every visible key is selected, the
row is dense and every selection metric is trivially perfect (mass 1, recall 1, Jaccard 1).
Selection metrics (mass@k, recall@k, Jaccard, frequency by position / distance, sink and
local-window shares, token types) are therefore averaged over the informative rows t + 1 > k
only; when a probe has none (T <= k) they are NaN. Distribution metrics (KL, entropy, score
statistics, head specialisation) use every query row.

The p of a query: the dense causal attention probabilities summed over the main heads and
L1-normalised over keys, `p[t, s] = mean_h dense[h, t, s]` (REFERENCE §1, the indexer's target).
"""

from __future__ import annotations

import math

import torch

from sparse_viz.model.selectors import topk_earliest_ties


# ---------------------------------------------------------------------------------------------
# Selections
# ---------------------------------------------------------------------------------------------
def informative_rows(seq_len: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T,) bool: True where query t has more visible keys than slots (t + 1 > k)."""
    return torch.arange(seq_len, device=device) + 1 > k


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool: True where key s is visible to query t (s <= t)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def selection_mask(selected: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Dense boolean form of a selection.

    Args:
        selected: (B, T, k) long key indices, -1 = empty slot.
        seq_len: T, the number of keys.

    Returns:
        (B, T, T) bool, mask[b, t, s] = key s is among the selected keys of query t.
    """
    B, T, _ = selected.shape
    # -1 pads go to an extra dump column that is dropped afterwards.
    index = torch.where(selected < 0, torch.full_like(selected, seq_len), selected)  # (B, T, k)
    mask = torch.zeros(B, T, seq_len + 1, dtype=torch.bool, device=selected.device)
    mask.scatter_(2, index, True)
    return mask[..., :seq_len]  # (B, T, T)


def topk_selection(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k keys of each query among its visible keys, -1 where a short row has fewer.

    Used for the indexer's would-be selection while attention is still dense (warm-up), and
    for the dense top-k of recall@k. Exact ties at the k-th score keep the earliest keys, the
    model's own rule (`topk_earliest_ties`), so the would-be selection is the one the model
    makes from the same scores.

    Args:
        scores: (B, T, T) float, future entries may hold anything (they are masked here).
        k: slots per query.

    Returns:
        (B, T, min(k, T)) long, key indices, -1 in slots beyond t + 1.
    """
    B, T, _ = scores.shape
    k = min(k, T)
    visible = causal_mask(T, scores.device)  # (T, T)
    masked = scores.float().masked_fill(~visible, -math.inf)  # (B, T, T)
    masked = torch.nan_to_num(masked, nan=-math.inf)
    # A short row's past keys come first either way: topk orders by score (finite before -inf),
    # a row tied at -inf is filled by index (its past keys are the lowest indices).
    index = topk_earliest_ties(masked, k)  # (B, T, k)
    slot = torch.arange(k, device=scores.device)  # (k,)
    row_len = torch.arange(T, device=scores.device) + 1  # (T,)
    # Slot j of row t is real only for j < t + 1 (topk fills the rest with future keys).
    real = slot[None, :] < row_len[:, None]  # (T, k)
    return torch.where(real[None], index, torch.full_like(index, -1))


def mean_over_rows(values: torch.Tensor, rows: torch.Tensor) -> float:
    """Mean of (B, T) `values` over the query rows where `rows` (T,) is True; NaN if none."""
    chosen = values[:, rows]  # (B, n_rows)
    if chosen.numel() == 0:
        return math.nan
    return float(chosen.float().mean())


def head_mean_probs(probs: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) attention probabilities -> (B, T, T) p, the mean over heads (rows sum to 1)."""
    return probs.float().mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Selection quality against the dense attention
# ---------------------------------------------------------------------------------------------
def attention_mass_at_k(dense_probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """mass@k of each query: the share of dense-attention mass that falls on the selected keys.

    mass@k[b, t] = mean_h sum_{s in S_t} dense[b, h, t, s]  (= sum_{s in S_t} p[b, t, s]).
    Summarise with `mean_over_rows(..., informative_rows(T, k))`. The oracle selector (top-k of
    p) maximises it, so oracle >= any other selector of the same k.

    Args:
        dense_probs: (B, H, T, T) dense causal attention probabilities.
        selected: (B, T, k) long, -1 pads.

    Returns:
        (B, T) float in [0, 1].
    """
    p = head_mean_probs(dense_probs)  # (B, T, T)
    mask = selection_mask(selected, p.shape[-1])  # (B, T, T)
    return (p * mask).sum(dim=-1)  # (B, T)


def recall_at_k(dense_probs: torch.Tensor, selected: torch.Tensor, k: int) -> torch.Tensor:
    """recall@k of each query: the share of the dense top-k keys (by p) that the selection holds.

    recall@k[b, t] = |S_t ∩ D_t| / |D_t| with D_t the top-min(k, t+1) keys of p[b, t, :].

    Args:
        dense_probs: (B, H, T, T) dense causal attention probabilities.
        selected: (B, T, k) long, -1 pads.
        k: slots per query (the dense top-k uses the same k).

    Returns:
        (B, T) float in [0, 1].
    """
    p = head_mean_probs(dense_probs)  # (B, T, T)
    T = p.shape[-1]
    dense_top = selection_mask(topk_selection(p, k), T)  # (B, T, T)
    chosen = selection_mask(selected, T)  # (B, T, T)
    hits = (dense_top & chosen).sum(dim=-1).float()  # (B, T)
    return hits / dense_top.sum(dim=-1).clamp(min=1).float()


def indexer_kl(dense_probs: torch.Tensor, index_scores: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) of each query over its visible keys, in nats.

    KL[b, t] = sum_{s <= t} p[t, s] (log p[t, s] - log_softmax_{s' <= t}(I[t, s'])[s]),
    with 0 log 0 = 0; computed with log_softmax over the causally masked row (REFERENCE §1).
    This is the dense warm-up loss of the indexer, per query.

    Args:
        dense_probs: (B, H, T, T) dense causal attention probabilities.
        index_scores: (B, T, T) indexer scores, future = -inf (masked again here).

    Returns:
        (B, T) float >= 0.
    """
    p = head_mean_probs(dense_probs)  # (B, T, T)
    T = p.shape[-1]
    visible = causal_mask(T, p.device)  # (T, T)
    p = p.masked_fill(~visible, 0.0)
    p = p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    log_q = index_scores.float().masked_fill(~visible, -math.inf).log_softmax(dim=-1)  # (B, T, T)
    log_p = torch.where(p > 0, p.clamp(min=1e-30).log(), torch.zeros_like(p))
    terms = torch.where(p > 0, p * (log_p - log_q.clamp(min=-1e30)), torch.zeros_like(p))
    return terms.sum(dim=-1)  # (B, T)


# ---------------------------------------------------------------------------------------------
# Stability and position biases
# ---------------------------------------------------------------------------------------------
def jaccard(selected_a: torch.Tensor, selected_b: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Jaccard overlap of two selections, per query: |A_t ∩ B_t| / |A_t ∪ B_t| (1 if both empty).

    Used with the previous snapshot's selection on the same probe (selection stability).

    Args:
        selected_a, selected_b: (B, T, k) long, -1 pads (k may differ).
        seq_len: T.

    Returns:
        (B, T) float in [0, 1].
    """
    a = selection_mask(selected_a, seq_len)
    b = selection_mask(selected_b, seq_len)
    inter = (a & b).sum(dim=-1).float()
    union = (a | b).sum(dim=-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def selection_frequency_by_position(selected: torch.Tensor, k: int) -> torch.Tensor:
    """Selection rate of each absolute key position s over the informative queries that see it.

    freq[s] = #{(b, t): t + 1 > k, t >= s, s in S_t} / #{(b, t): t + 1 > k, t >= s}.
    A sink at token 0 shows as freq[0] close to 1; uniform random selection gives k / (t + 1).

    Args:
        selected: (B, T, k) long, -1 pads.
        k: slots per query.

    Returns:
        (T,) float; NaN at positions no informative query sees.
    """
    B, T, _ = selected.shape
    rows = informative_rows(T, k, selected.device)  # (T,)
    mask = selection_mask(selected, T) & rows[None, :, None]  # (B, T, T)
    eligible = causal_mask(T, selected.device) & rows[:, None]  # (T, T)
    hits = mask.sum(dim=(0, 1)).float()  # (T,)
    seen = eligible.sum(dim=0).float() * B  # (T,)
    return torch.where(seen > 0, hits / seen.clamp(min=1), torch.full_like(hits, math.nan))


def selection_frequency_by_distance(selected: torch.Tensor, k: int) -> torch.Tensor:
    """Selection rate of each distance d = t - s over the informative queries with t >= d.

    freq[d] = #{(b, t): t + 1 > k, t >= d, t - d in S_t} / #{(b, t): t + 1 > k, t >= d}.
    A recency bias shows as high freq at small d; the `local` selector gives 1 for d < k.

    Args:
        selected: (B, T, k) long, -1 pads.
        k: slots per query.

    Returns:
        (T,) float indexed by distance; NaN where no informative query has t >= d.
    """
    B, T, _ = selected.shape
    rows = informative_rows(T, k, selected.device)  # (T,)
    t = torch.arange(T, device=selected.device)
    distance = (t[:, None] - t[None, :]).clamp(min=0)  # (T, T) d[t, s] = t - s
    valid = causal_mask(T, selected.device) & rows[:, None]  # (T, T)
    mask = selection_mask(selected, T) & valid[None]  # (B, T, T)
    hits = torch.zeros(T, device=selected.device).index_add_(
        0, distance[valid], mask[:, valid].sum(dim=0).float()
    )
    seen = torch.zeros(T, device=selected.device).index_add_(
        0, distance[valid], torch.full((int(valid.sum()),), float(B), device=selected.device)
    )
    return torch.where(seen > 0, hits / seen.clamp(min=1), torch.full_like(hits, math.nan))


def sink_share(selected: torch.Tensor, k: int) -> float:
    """Share of the informative rows' selected keys that are token 0 (the attention sink).

    sink = #{selections of key 0} / #{selections}, over rows t + 1 > k; NaN if none.
    A query picks key 0 at most once, so a selector that always keeps the sink gives 1 / k.
    """
    T = selected.shape[1]
    rows = informative_rows(T, k, selected.device)
    chosen = selected[:, rows]  # (B, n, k)
    total = (chosen >= 0).sum()
    if int(total) == 0:
        return math.nan
    return float((chosen == 0).sum()) / float(total)


def local_window_share(selected: torch.Tensor, k: int, window: int | None = None) -> float:
    """Share of the informative rows' selected keys within the local window t - s < window.

    window defaults to k: the share of the selection that the `local` selector (the last k
    keys) would also have chosen. The local selector itself gives 1.
    """
    window = k if window is None else window
    T = selected.shape[1]
    rows = informative_rows(T, k, selected.device)
    t = torch.arange(T, device=selected.device)[rows]  # (n,)
    chosen = selected[:, rows]  # (B, n, k)
    real = chosen >= 0
    total = real.sum()
    if int(total) == 0:
        return math.nan
    near = real & ((t[None, :, None] - chosen) < window)
    return float(near.sum()) / float(total)


def keys_share(seq_len: int, k: int | None) -> float:
    """Efficiency: mean over queries of (keys attended) / (keys visible) = min(k, t+1) / (t+1).

    k=None means dense attention (share 1).
    """
    if k is None:
        return 1.0
    t = torch.arange(seq_len, dtype=torch.float64)
    return float((torch.clamp(t + 1, max=k) / (t + 1)).mean())


# ---------------------------------------------------------------------------------------------
# Distributions: indexer scores, indexer heads, attention entropy
# ---------------------------------------------------------------------------------------------
def index_score_statistics(index_scores: torch.Tensor, bins: int = 40) -> dict:
    """Distribution of the indexer scores I[t, s] over the visible pairs s <= t.

    Args:
        index_scores: (B, T, T), future = -inf.
        bins: histogram bins over [min, max].

    Returns:
        dict with `mean`, `std`, `min`, `max` (floats), `hist` (bins,) counts and
        `edges` (bins + 1,) as float64 tensors.
    """
    T = index_scores.shape[-1]
    values = index_scores.float()[:, causal_mask(T, index_scores.device)]  # (B, n_pairs)
    values = values[torch.isfinite(values)].double()
    if values.numel() == 0:
        nan = math.nan
        return {"mean": nan, "std": nan, "min": nan, "max": nan,
                "hist": torch.zeros(bins, dtype=torch.float64), "edges": torch.zeros(bins + 1, dtype=torch.float64)}
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1e-6
    hist = torch.histc(values, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "min": lo, "max": float(values.max()),
            "hist": hist, "edges": edges}


def indexer_head_specialisation(index_head_terms: torch.Tensor) -> dict:
    """How differently the indexer heads score keys.

    With c_j[t, s] = w[t, j] ReLU(q_j[t] . k[s]) d_I^-1/2 (the term of head j, summing to I):
      - weight_share[j] = sum_{t, s<=t} |c_j| / sum_{j'} sum_{t, s<=t} |c_j'|: the head's share of
        the total absolute contribution (1 / H_I each when all heads weigh the same).
      - specialisation[j] = 1 - H(a_j[t, :]) / log(t + 1), averaged over rows t >= 1 where the
        head contributes anything, with a_j[t, s] = |c_j[t, s]| / sum_{s'<=t} |c_j[t, s']|:
        0 = the head spreads its contribution evenly over all visible keys, 1 = it puts it all
        on one key.
      - redundancy = mean Pearson correlation between the heads' c_j maps over visible pairs
        (off-diagonal pairs; 1 = every head says the same).

    Args:
        index_head_terms: (B, H_I, T, T); entries with s > t are ignored.

    Returns:
        dict with `weight_share` (H_I,), `specialisation` (H_I,) tensors and `redundancy` float.
    """
    B, HI, T, _ = index_head_terms.shape
    visible = causal_mask(T, index_head_terms.device)  # (T, T)
    terms = torch.nan_to_num(index_head_terms.float(), nan=0.0, posinf=0.0, neginf=0.0)
    terms = terms.masked_fill(~visible, 0.0)  # (B, H_I, T, T)
    magnitude = terms.abs()
    per_head = magnitude.sum(dim=(0, 2, 3))  # (H_I,)
    weight_share = per_head / per_head.sum().clamp(min=1e-30)

    row_sum = magnitude.sum(dim=-1, keepdim=True)  # (B, H_I, T, 1)
    share = magnitude / row_sum.clamp(min=1e-30)  # (B, H_I, T, T)
    entropy = -(torch.where(share > 0, share * share.clamp(min=1e-30).log(), torch.zeros_like(share))).sum(-1)
    log_visible = torch.log(torch.arange(T, device=terms.device, dtype=torch.float32) + 1)  # (T,)
    usable = (row_sum[..., 0] > 0) & (log_visible > 0)[None, None]  # (B, H_I, T)
    spec = torch.where(usable, 1 - entropy / log_visible.clamp(min=1e-30), torch.zeros_like(entropy))
    specialisation = spec.sum(dim=(0, 2)) / usable.sum(dim=(0, 2)).clamp(min=1)  # (H_I,)
    specialisation = torch.where(usable.sum(dim=(0, 2)) > 0, specialisation,
                                 torch.full_like(specialisation, math.nan))

    if HI > 1:
        flat = terms[:, :, visible].permute(1, 0, 2).reshape(HI, -1)  # (H_I, B * n_pairs)
        corr = torch.corrcoef(flat)  # (H_I, H_I), NaN for a constant head
        off = ~torch.eye(HI, dtype=torch.bool, device=terms.device)
        values = corr[off]
        values = values[torch.isfinite(values)]
        redundancy = float(values.mean()) if values.numel() else math.nan
    else:
        redundancy = math.nan
    return {"weight_share": weight_share, "specialisation": specialisation, "redundancy": redundancy}


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each head's attention row, in nats: H[b, h, t] = -sum_s a log a (0 log 0 = 0).

    Sparse attention rows (zero off the selection) have entropy at most log k; dense rows at
    most log(t + 1).

    Args:
        probs: (B, H, T, T) attention probabilities.

    Returns:
        (B, H, T) float.
    """
    probs = probs.float()
    return -(torch.where(probs > 0, probs * probs.clamp(min=1e-30).log(), torch.zeros_like(probs))).sum(-1)


def head_distance_profile(probs: torch.Tensor, n_buckets: int | None = None) -> torch.Tensor:
    """Per-head features for pattern clustering: attention mass by log2 distance bucket.

    feature[h, 0] = mass on key 0 (sink); feature[h, 1 + m] = mean over queries of the mass at
    distances d with floor(log2(d + 1)) = m; the last feature is the head's mean entropy
    normalised by log(T).

    Args:
        probs: (B, H, T, T) attention probabilities.
        n_buckets: number of distance buckets (default floor(log2(T)) + 1).

    Returns:
        (H, n_buckets + 2) float.
    """
    B, H, T, _ = probs.shape
    probs = probs.float()
    n_buckets = n_buckets or (int(math.log2(T)) + 1)
    t = torch.arange(T, device=probs.device)
    distance = (t[:, None] - t[None, :]).clamp(min=0)  # (T, T)
    bucket = torch.floor(torch.log2(distance.float() + 1)).long().clamp(max=n_buckets - 1)  # (T, T)
    visible = causal_mask(T, probs.device)
    onehot = torch.nn.functional.one_hot(bucket, n_buckets).float() * visible[..., None]  # (T, T, n)
    by_bucket = torch.einsum("bhts,tsn->hn", probs, onehot) / (B * T)  # (H, n)
    sink = probs[..., 0].mean(dim=(0, 2))  # (H,)
    entropy = attention_entropy(probs).mean(dim=(0, 2)) / max(math.log(T), 1e-30)  # (H,)
    return torch.cat([sink[:, None], by_bucket, entropy[:, None]], dim=1)
