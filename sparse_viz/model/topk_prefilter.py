"""Exact top-k of long score rows without ranking every entry: a group-maxima threshold first.

`torch.topk` on a CPU ranks every entry of a row; for k = 256 of 8192 keys that is most of the
blockwise indexer's selection time. The k-th largest entry of a row can be bounded from below
cheaply:

    split the row into groups of c entries; m = the k-th largest of the group maxima.
    At least k groups hold an entry >= m, so at least k entries are >= m: the k-th largest
    entry (and every entry that can be selected, ties included) is >= m.

Any partition into groups gives a bound; strided groups (entries j, j + n, j + 2n, ... for a row
of c * n) make the maxima an elementwise max of c contiguous slices, one vectorised pass.

So the entries >= m (a few hundred for k = 256 of 8192 on realistic scores) hold the whole
answer: they are compacted, in their original order, into a short row, and
`topk_earliest_ties` runs there. Keeping the order keeps the tie rule (earliest keys among exact
ties at the k-th value): the result is the same set of indices as `topk_earliest_ties` on the
full row, which stays the readable reference. Rows where the bound prunes little (many equal
scores, e.g. ReLU's zeros early in training; or too few groups) fall back to the reference.
"""

from __future__ import annotations

import torch

from .selectors import earliest_k_from, topk_earliest_ties

MAX_GROUP, MIN_GROUP = 16, 4  # measured (k = 256): rows of 2048 keys and more gain, shorter ones do not


def topk_earliest_ties_prefiltered(scores: torch.Tensor, k: int, group: int | None = None,
                                   max_share: float = 0.25) -> torch.Tensor:
    """Indices of the k largest entries of each row, earliest among ties: `topk_earliest_ties`.

    Args:
        scores: (R, S) float, no NaN (-inf allowed, e.g. future keys).
        k: 1 <= k <= S.
        group: entries per group of the bound; None = the largest of 4 .. 16 that leaves at
            least 2k groups (with exactly k groups the bound is the least maximum, which prunes
            little: 2160 of 4096 entries kept against 368 with 2k); rows too short for 4 take
            the reference.
        max_share: fall back to the reference when the longest candidate row is more than this
            share of S (the bound pruned too little to pay for the compaction).

    Returns:
        (R, k) long indices (ascending where the bound was used; in no particular order where
        the reference ran, as the reference's own).
    """
    R, S = scores.shape
    if group is None:
        group = min(MAX_GROUP, S // (2 * k))
        if group < MIN_GROUP:
            return topk_earliest_ties(scores, k)
    n = S // group  # groups per row; the last S - group * n entries are in none (the bound holds without them)
    if n < k or R == 0:
        return topk_earliest_ties(scores, k)
    maxima = scores[:, : group * n].view(R, group, n).amax(dim=1)  # (R, n) max of entries j, j + n, ...
    bound = maxima.kthvalue(n - k + 1, dim=-1, keepdim=True).values  # (R, 1) the k-th largest maximum
    rows, cols = (scores >= bound).nonzero(as_tuple=True)  # (N,) each, row-major: ascending cols within a row
    counts = torch.bincount(rows, minlength=R)  # (R,) candidates per row, each >= k
    width = int(counts.max())
    if width > max_share * S:
        return topk_earliest_ties(scores, k)
    starts = torch.cumsum(counts, 0) - counts  # (R,) where each row's candidates begin in (N,)
    slot = torch.arange(rows.numel(), device=scores.device) - starts[rows]  # (N,) place within its row
    compact = scores.new_full((R, width), float("-inf"))  # (R, width); padding never reaches the top k
    compact[rows, slot] = scores[rows, cols]
    position = torch.zeros(R, width, dtype=torch.long, device=scores.device)  # (R, width) original index
    position[rows, slot] = cols
    # The short rows' own top k, earliest among ties, as `topk_earliest_ties` does for tied rows:
    # everything above the k-th value, then the first tied entries. The bound is finite (else the
    # candidates were every entry and the reference ran), so the -inf padding is below it.
    kth = compact.kthvalue(width - k + 1, dim=-1, keepdim=True).values  # (R, 1) the k-th largest
    return position.gather(1, earliest_k_from(compact, kth, k))  # (R, k), ascending
