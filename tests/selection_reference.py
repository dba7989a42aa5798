"""Brute-force references for the tracking metrics: plain Python loops over positions.

Each function restates one definition of `sparse_viz/tracking/metrics.py` (or of the per-probe
summaries of `analyse_probe`) the slow, obvious way, on nested Python lists, and imports nothing
from `sparse_viz`: a test that compares the library with these shares no code with it.

Conventions (those of the library's docstrings): a selection is `sel[b][t]`, a list of key
indices with -1 for an empty slot; dense attention is `probs[b][h][t][s]`; query t sees the keys
s <= t; a row is informative when t + 1 > k.
"""

from __future__ import annotations

import math


def tolist(x):
    """A tensor or array as nested Python lists (plain floats / ints)."""
    return x.tolist() if hasattr(x, "tolist") else x


def keys_of(row) -> set[int]:
    """The selected keys of one query (pads dropped)."""
    return {int(s) for s in row if s >= 0}


def head_mean(probs, b: int, t: int, s: int) -> float:
    """p[b, t, s] = mean over heads of the dense attention."""
    heads = probs[b]
    return sum(heads[h][t][s] for h in range(len(heads))) / len(heads)


def informative(t: int, k: int) -> bool:
    return t + 1 > k


def mass_at_k(probs, sel, b: int, t: int) -> float:
    return sum(head_mean(probs, b, t, s) for s in keys_of(sel[b][t]))


def dense_top_keys(probs, b: int, t: int, k: int) -> set[int]:
    """The min(k, t + 1) visible keys with the largest p (the inputs have no ties)."""
    ranked = sorted(range(t + 1), key=lambda s: -head_mean(probs, b, t, s))
    return set(ranked[: min(k, t + 1)])


def recall_at_k(probs, sel, b: int, t: int, k: int) -> float:
    top = dense_top_keys(probs, b, t, k)
    return len(top & keys_of(sel[b][t])) / len(top)


def jaccard(sel_a, sel_b, b: int, t: int) -> float:
    a, c = keys_of(sel_a[b][t]), keys_of(sel_b[b][t])
    return 1.0 if not (a | c) else len(a & c) / len(a | c)


def mean_over_informative(fn, batch: int, seq_len: int, k: int) -> float:
    """Mean of fn(b, t) over every probe row b and informative query t."""
    values = [fn(b, t) for b in range(batch) for t in range(seq_len) if informative(t, k)]
    return sum(values) / len(values) if values else math.nan


def frequency_by_position(sel, k: int) -> list[float]:
    """freq[s] = times s is selected / times s is visible, over informative queries."""
    B, T = len(sel), len(sel[0])
    out = []
    for s in range(T):
        hits = seen = 0
        for b in range(B):
            for t in range(s, T):
                if informative(t, k):
                    seen += 1
                    hits += s in keys_of(sel[b][t])
        out.append(hits / seen if seen else math.nan)
    return out


def frequency_by_distance(sel, k: int) -> list[float]:
    """freq[d] = times the key at distance d = t - s is selected / informative queries with t >= d."""
    B, T = len(sel), len(sel[0])
    out = []
    for d in range(T):
        hits = seen = 0
        for b in range(B):
            for t in range(d, T):
                if informative(t, k):
                    seen += 1
                    hits += (t - d) in keys_of(sel[b][t])
        out.append(hits / seen if seen else math.nan)
    return out


def selected_pairs(sel, k: int):
    """Every (b, t, s) with s selected by an informative query t."""
    for b, rows in enumerate(sel):
        for t, row in enumerate(rows):
            if informative(t, k):
                for s in keys_of(row):
                    yield b, t, s


def sink_share(sel, k: int) -> float:
    pairs = list(selected_pairs(sel, k))
    return sum(s == 0 for _, _, s in pairs) / len(pairs) if pairs else math.nan


def local_share(sel, k: int, window: int) -> float:
    pairs = list(selected_pairs(sel, k))
    return sum(t - s < window for _, t, s in pairs) / len(pairs) if pairs else math.nan


def entropy(row) -> float:
    """-sum a log a over one attention row, 0 log 0 = 0."""
    return -sum(a * math.log(a) for a in row if a > 0)


def mean_entropy(probs) -> float:
    """Entropy averaged over probe rows, heads and queries."""
    values = [entropy(row) for heads in probs for rows in heads for row in rows]
    return sum(values) / len(values)


def indexer_kl(probs, scores, b: int, t: int) -> float:
    """KL(p[t, :t+1] || softmax(I[t, :t+1])) in nats; future scores take no part."""
    p = [head_mean(probs, b, t, s) for s in range(t + 1)]
    total = sum(p)
    p = [v / total for v in p]
    row = scores[b][t][: t + 1]
    top = max(row)
    log_norm = top + math.log(sum(math.exp(v - top) for v in row))
    return sum(pv * (math.log(pv) - (row[s] - log_norm)) for s, pv in enumerate(p) if pv > 0)


def score_statistics(scores, bins: int) -> dict:
    """mean, sample std, min, max and an equal-width histogram over [min, max] of the finite
    scores I[b, t, s] with s <= t; a value on an inner edge counts in the upper bin, max in the last."""
    values = [v for rows in scores for t, row in enumerate(rows) for v in row[: t + 1] if math.isfinite(v)]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    lo, hi = min(values), max(values)
    hist = [0] * bins
    for v in values:
        hist[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    return {"mean": mean, "std": std, "min": lo, "max": hi, "hist": hist, "edges": edges}


def distance_bucket(d: int) -> int:
    """floor(log2(d + 1)) by integer arithmetic: 0 for d = 0, 1 for d = 1..2, 2 for 3..6, ..."""
    return (d + 1).bit_length() - 1


def head_distance_profile(probs, n_buckets: int) -> list[list[float]]:
    """Per head: [mass on key 0, mass by distance bucket (summed within a query, averaged over
    queries), mean row entropy / log T]; distances past the last bucket go into the last one."""
    B, H, T = len(probs), len(probs[0]), len(probs[0][0])
    out = []
    for h in range(H):
        sink = sum(probs[b][h][t][0] for b in range(B) for t in range(T)) / (B * T)
        buckets = [0.0] * n_buckets
        for b in range(B):
            for t in range(T):
                for s in range(t + 1):
                    buckets[min(distance_bucket(t - s), n_buckets - 1)] += probs[b][h][t][s]
        buckets = [v / (B * T) for v in buckets]
        mean_h = sum(entropy(probs[b][h][t]) for b in range(B) for t in range(T)) / (B * T)
        out.append([sink, *buckets, mean_h / math.log(T)])
    return out


def head_specialisation(terms) -> dict:
    """weight_share, specialisation and redundancy of the indexer heads (definitions in
    `indexer_head_specialisation`'s docstring), from the per-head terms c[b][j][t][s]."""
    B, HI, T = len(terms), len(terms[0]), len(terms[0][0])
    magnitude = [sum(abs(terms[b][j][t][s]) for b in range(B) for t in range(T) for s in range(t + 1))
                 for j in range(HI)]
    total = sum(magnitude)
    weight_share = [m / total for m in magnitude]
    specialisation = []
    for j in range(HI):
        values = []
        for b in range(B):
            for t in range(1, T):
                row = [abs(terms[b][j][t][s]) for s in range(t + 1)]
                row_sum = sum(row)
                if row_sum > 0:
                    values.append(1 - entropy([a / row_sum for a in row]) / math.log(t + 1))
        specialisation.append(sum(values) / len(values) if values else math.nan)
    flat = [[terms[b][j][t][s] for b in range(B) for t in range(T) for s in range(t + 1)] for j in range(HI)]

    def pearson(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        cov = sum((a - mx) * (c - my) for a, c in zip(x, y))
        return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((c - my) ** 2 for c in y))

    pairs = [pearson(flat[i], flat[j]) for i in range(HI) for j in range(HI) if i != j]
    return {"weight_share": weight_share, "specialisation": specialisation,
            "redundancy": sum(pairs) / len(pairs) if pairs else math.nan}


def type_shares(sel, types, k: int) -> tuple[list[float], list[float]]:
    """(share of the selections whose key has each type, share of the visible keys that have it),
    both over the informative queries of every probe row; types[b][s][j] is bool."""
    B, T, n_types = len(sel), len(sel[0]), len(types[0][0])
    picked = [0] * n_types
    n_picked = 0
    for b, _, s in selected_pairs(sel, k):
        n_picked += 1
        for j in range(n_types):
            picked[j] += bool(types[b][s][j])
    seen = [0] * n_types
    n_seen = 0
    for b in range(B):
        for t in range(T):
            if informative(t, k):
                for s in range(t + 1):
                    n_seen += 1
                    for j in range(n_types):
                        seen[j] += bool(types[b][s][j])
    return [v / n_picked for v in picked], [v / n_seen for v in seen]


def token_selection_counts(sel, ids, k: int) -> dict[int, int]:
    """How many times each token id was selected by an informative query (ids[b][s])."""
    counts: dict[int, int] = {}
    for b, _, s in selected_pairs(sel, k):
        counts[int(ids[b][s])] = counts.get(int(ids[b][s]), 0) + 1
    return counts
