"""How well a selection of keys agrees with their causal impact, query by query.

For a layer's impact matrix I[t, s] (the change of the attention block's output at t when key s
alone is hidden from t; `masking/all_pairs.py`) and a selection S_t of k keys per query:

    impact_recall@k[t] = |S_t ∩ top-k of I[t, :t+1]| / k      (the selection's hit rate on the
                                                             keys that matter most)
    impact_share[t]    = sum_{s in S_t} I[t, s] / sum_{s <= t} I[t, s]
    spearman[t]        = rank correlation of a score (indexer scores, attention mass) with
                         I[t, :t+1], average ranks for ties

Only queries with t + 1 > k count (shorter rows are dense: every selector keeps every key). The
top-k of impact breaks exact ties by position; the oracle (top-k of attention mass) is a
selection like the others and is not assumed to score 1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


def scored_rows(n_tokens: int, k: int) -> np.ndarray:
    """Query positions whose rows have more than k keys: t + 1 > k."""
    return np.arange(k, n_tokens)


def impact_recall_at_k(selected: torch.Tensor, impact: torch.Tensor, k: int) -> np.ndarray:
    """Share of each query's k highest-impact keys that the selection holds.

    Args:
        selected: (T, k') long, selected keys per query (-1 = unfilled).
        impact: (T, T) float, finite for s <= t.
        k: the k of top-k impact.

    Returns:
        (len(rows),) float64 for the rows t >= k.
    """
    out = []
    for t in scored_rows(impact.shape[0], k):
        row = impact[t, : t + 1]
        top = set(torch.topk(row, k).indices.tolist())
        chosen = {s for s in selected[t].tolist() if 0 <= s <= t}
        out.append(len(top & chosen) / k)
    return np.asarray(out, dtype=np.float64)


def impact_share(selected: torch.Tensor, impact: torch.Tensor, k: int) -> np.ndarray:
    """Share of each query's total impact that falls on its selected keys.

    Args:
        selected: (T, k') long; impact: (T, T); k: rows t >= k count.

    Returns:
        (len(rows),) float64 (NaN where a row's total impact is 0).
    """
    out = []
    for t in scored_rows(impact.shape[0], k):
        row = impact[t, : t + 1].double()
        chosen = sorted({s for s in selected[t].tolist() if 0 <= s <= t})
        total = float(row.sum())
        out.append(float(row[chosen].sum()) / total if total > 0 else float("nan"))
    return np.asarray(out, dtype=np.float64)


def spearman_by_row(scores: torch.Tensor, impact: torch.Tensor, k: int) -> np.ndarray:
    """Spearman rank correlation of `scores` with impact over each row's causal keys.

    Args:
        scores: (T, T) float, the selector's scores (higher = more likely kept).
        impact: (T, T) float.
        k: rows t >= k count.

    Returns:
        (len(rows),) float64; NaN where either row is constant.
    """
    out = []
    for t in scored_rows(impact.shape[0], k):
        a = rankdata(scores[t, : t + 1].double().numpy())
        b = rankdata(impact[t, : t + 1].double().numpy())
        a, b = a - a.mean(), b - b.mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        out.append(float((a * b).sum() / denominator) if denominator > 0 else float("nan"))
    return np.asarray(out, dtype=np.float64)
