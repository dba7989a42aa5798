"""The Lightning Indexer without a T x T matrix: top-k and losses by query blocks.

`LightningIndexer.forward` is the readable reference: it holds (B, T, H_I, T) logits and a
(B, T, T) score matrix per layer. At long T that is the training step's peak memory. Here the
same quantities come from `LightningIndexer.project`'s (q, k, w), computed where they are used:

- `blockwise_topk`: the selection, one block of queries at a time; a block of queries
  [start, end) only scores the keys s < end (the rest is its future), so it never holds more
  than (B, block, H_I, end) logits. No gradient (top-k has none, REFERENCE §1). On a CPU the
  top-k of long rows goes through a bound that skips most keys (`topk_prefilter.py`), and where
  the fused kernels are built, one query row at a time in C++ (`fused_kernels.fused_index_topk`).
- `selected_index_scores`: I[t, s] at the k selected keys of each query only, with gradient:
  T x k x H_I x d_I work instead of T x T, for the sparse stage's KL over the selected set.
- `selected_index_kl`: the sparse stage's loss on those scores, KL(p || softmax(I)) per row
  (fused: neither the scores nor the loss's intermediates stored).
- `blockwise_causal_kl`: the warm-up KL over ALL causal keys, needs full rows, so it goes by
  query blocks, each recomputed in backward (activation checkpointing) instead of keeping
  every block's logits for the gradient. Its target (main attention summed over heads) is
  recomputed per block from the main queries and keys, without gradient.

Selections equal `topk_causal`'s on the full matrix: both keep the earliest keys among exact
ties at the k-th score (`topk_earliest_ties`; ties are common: ReLU makes every score of a key 0
when all its head products are negative), so the selection depends on the scores only, not on
the block size. What could still differ: a block's product is shaped differently from the full
one and may round the last bit differently (seen: 2.4e-7 with one-query blocks), so two keys
whose scores agree to rounding could swap. Losses and gradients agree to float32 round-off.
The causal and short-row rules are the selectors' own (`dense_short_rows`,
`canonical_selection`): no future key is ever selected, rows with t + 1 <= k are dense.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .csr_attention import (
    SelectionPattern,
    csr_kernels_available,
    csr_selected_index_scores,
)
from .fused_kernels import (
    fused_index_topk,
    fused_kernels_available,
    fused_selected_index_kl,
    fused_selected_index_scores,
)
from .indexer import indexer_kl
from .selectors import canonical_selection, dense_short_rows, topk_earliest_ties
from .topk_prefilter import topk_earliest_ties_prefiltered

INDEXER_BLOCK = 256  # queries per block: bounds the (B, block, H_I, T) logits


def block_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, start: int) -> torch.Tensor:
    """Eq. 1 for one block of queries against keys 0..S-1; -inf on the block's future keys.

    The same products, in the same order, as `LightningIndexer.forward` restricted to rows
    start..start+Tb-1 and columns 0..S-1.

    Args:
        q: (B, Tb, H_I, d_I) queries of positions start .. start + Tb - 1.
        k: (B, S, d_I) keys of positions 0 .. S - 1.
        w: (B, Tb, H_I) head weights (scales folded in, see `LightningIndexer.project`).
        start: position of the block's first query.

    Returns:
        (B, Tb, S) scores I[t, s]; -inf where s > t.
    """
    B, Tb, H, d = q.shape
    S = k.shape[1]
    logits = torch.relu(q.reshape(B, Tb * H, d) @ k.transpose(1, 2)).view(B, Tb, H, S)  # (B, Tb, H_I, S)
    scores = (w[:, :, None, :] @ logits).squeeze(2)  # (B, Tb, S)
    t = start + torch.arange(Tb, device=q.device)[:, None]  # (Tb, 1)
    future = torch.arange(S, device=q.device)[None, :] > t  # (Tb, S)
    return scores.masked_fill(future, float("-inf"))


@torch.no_grad()
def blockwise_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int, block_size: int = INDEXER_BLOCK,
    prefilter: bool | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """`topk_causal` of the index scores, computed by query blocks.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
        top_k: keys per query.
        block_size: queries per block (> 0; need not divide T).
        prefilter: rank only the keys above a bound (`topk_prefilter.py`; same result); None =
            on a CPU, where it pays (on a GPU its data-dependent sizes would synchronise).
        kernel: "fused" = the C++ kernel, one row's scores at a time (CPU; block_size and
            prefilter do not apply); "torch" = the blocks above; "auto" = fused where built.

    Under autocast, q and k are rounded to autocast's dtype, the inputs the full path's
    `q @ k^T` takes there, and their products summed in float32 (bfloat16 products are exact in
    float32; the fused kernel reads bfloat16 as stored, twice the products per instruction).

    Returns:
        (B, T, min(top_k, T)) long, in `select_keys` order (valid keys ascending, -1 last).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if kernel not in ("auto", "fused", "torch"):
        raise ValueError(f"kernel must be auto, fused or torch, got {kernel!r}")
    autocast = torch.is_autocast_enabled(q.device.type)
    if autocast:
        low = torch.get_autocast_dtype(q.device.type)
        q, k = q.to(low), k.to(low)
    if kernel == "fused" or (kernel == "auto" and fused_kernels_available(q)):
        return fused_index_topk(q, k, w, top_k)
    # The `out=` products below need one dtype: the widest of the three (under autocast the
    # projections arrive in mixed precisions), and at least float32 for autocast's rounded inputs.
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), w.dtype)
    if autocast:
        dtype = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return _blockwise_topk(q.to(dtype), k.to(dtype), w.to(dtype), top_k, block_size,
                               q.device.type == "cpu" if prefilter is None else prefilter)


def _blockwise_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int, block_size: int,
                    prefilter: bool) -> torch.Tensor:
    B, T, H, d = q.shape
    kk = min(top_k, T)
    selected = torch.empty(B, T, kk, dtype=torch.long, device=q.device)
    short = min(top_k, T)  # rows t + 1 <= top_k are dense: 0..t, then -1; no scores needed
    selected[:, :short] = dense_short_rows(selected[:, :short], top_k)
    # `block_index_scores`, written into two buffers allocated once: a new (B, block, H_I, end)
    # tensor per block, each larger than the last, would leave the freed ones behind as heap
    # fragments (the process's resident memory grows by about the largest one per block).
    block = min(block_size, T)
    logits_buffer = q.new_empty(B * block * H * T)  # (B, block*H_I, up to T) logits, flat
    scores_buffer = q.new_empty(B * block * T)  # (B, block, up to T) scores, flat
    key_index = torch.arange(T, device=q.device)  # (T,)
    for start in range(short, T, block_size):
        end = min(start + block_size, T)
        Tb = end - start
        logits = logits_buffer[: B * Tb * H * end].view(B, Tb * H, end)  # (B, Tb*H_I, end)
        torch.bmm(q[:, start:end].reshape(B, Tb * H, d), k[:, :end].transpose(1, 2), out=logits)
        logits = logits.relu_().view(B, Tb, H, end)  # (B, Tb, H_I, end)
        scores = scores_buffer[: B * Tb * end].view(B, Tb, 1, end)
        torch.matmul(w[:, start:end, None, :], logits, out=scores)  # (B, Tb, 1, end)
        scores = scores.view(B, Tb, end)  # (B, Tb, end) the full matrix's rows, up to the block's last key
        future = key_index[None, :end] > (start + torch.arange(Tb, device=q.device))[:, None]  # (Tb, end)
        scores = scores.masked_fill_(future, float("-inf"))
        if prefilter:  # same indices, found without ranking every key
            block_selected = topk_earliest_ties_prefiltered(scores.view(B * Tb, end), kk).view(B, Tb, kk)
        else:
            block_selected = topk_earliest_ties(scores, kk)  # (B, Tb, kk)
        # Sorted, and any future slot dropped (none can be: each row has more than kk past keys).
        selected[:, start:end] = canonical_selection(block_selected, T, first_row=start)
    return selected


def selected_index_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    selected: torch.Tensor,
    kernel: str = "auto",
    chunk_size: int = INDEXER_BLOCK,
    pattern: SelectionPattern | None = None,
) -> torch.Tensor:
    """I[t, s] at each query's selected keys only, differentiable in q, k and w.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
        selected: (B, T, kk) long, causal, -1 = unfilled slot.
        kernel: "fused" = the C++ kernel (CPU, any row order); "csr" = sampled CSR products
            reading the selected keys in place (CPU; needs rows in `select_keys` order);
            "copy" = gather copies of the selected keys, by query chunks (any device);
            "auto" = fused where built, else csr where available.
        chunk_size: queries per chunk of the `copy` kernel.
        pattern: the csr kernel's `SelectionPattern(selected)`, shared with the attention's.

    Returns:
        (B, T, kk) float; 0 on unfilled slots (as `gather_selected` of the full scores).
    """
    if kernel not in ("auto", "fused", "csr", "copy"):
        raise ValueError(f"kernel must be auto, fused, csr or copy, got {kernel!r}")
    if kernel == "fused" or (kernel == "auto" and fused_kernels_available(q)):
        return fused_selected_index_scores(q, k, w, selected)  # 0 on unfilled slots already
    B, T = q.shape[:2]
    valid = selected >= 0  # (B, T, kk)
    if kernel == "csr" or (kernel == "auto" and csr_kernels_available(q) and q.dtype in (torch.float32, torch.float64)):
        scores = csr_selected_index_scores(q, k, w, selected, pattern)  # (B, T, kk)
    else:
        batch = torch.arange(B, device=q.device)[:, None, None]  # (B, 1, 1)
        chunks = []
        for start in range(0, T, chunk_size):
            sel = selected[:, start : start + chunk_size].clamp(min=0)  # (B, Tc, kk)
            k_sel = k[batch, sel]  # (B, Tc, kk, d_I)
            logits = torch.einsum("bthd,btjd->bthj", q[:, start : start + chunk_size], k_sel)  # (B, Tc, H_I, kk)
            chunks.append(torch.einsum("bthj,bth->btj", torch.relu(logits), w[:, start : start + chunk_size]))
        scores = torch.cat(chunks, dim=1)  # (B, T, kk)
    return scores.masked_fill(~valid, 0.0)


def selected_index_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    selected: torch.Tensor,
    target: torch.Tensor,
    kernel: str = "auto",
    pattern: SelectionPattern | None = None,
) -> torch.Tensor:
    """The sparse stage's indexer loss: KL(p || softmax(I)) per query row over its selected keys.

    The readable path is `indexer_kl(target, selected_index_scores(...), selected >= 0)`; the
    fused kernel computes the same per row from the indexer's (q, k, w) without storing the
    (B, T, kk) scores or the loss's (B, T, kk) intermediates (at T = 8192, k = 256: 8 MB each).

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
        selected: (B, T, kk) long, causal, -1 = unfilled slot (int32 too, for the fused kernel).
        target: (B, T, kk) non-negative weights p at the selected keys (the main attention summed
            over heads), L1-normalised per row here; detached.
        kernel: "fused" = the C++ kernel (CPU); "csr" / "copy" = `selected_index_scores` with that
            kernel, then `indexer_kl`; "auto" = fused where built, else the scores' own choice.
        pattern: the csr kernel's `SelectionPattern(selected)`, shared with the attention's.

    Returns:
        (B, T) KL per query row; 0 for a row with no valid key or no target mass.
    """
    if kernel not in ("auto", "fused", "csr", "copy"):
        raise ValueError(f"kernel must be auto, fused, csr or copy, got {kernel!r}")
    if kernel == "fused" or (kernel == "auto" and fused_kernels_available(q)):
        return fused_selected_index_kl(q, k, w, selected, target)
    scores = selected_index_scores(q, k, w, selected, kernel=kernel, pattern=pattern)  # (B, T, kk)
    return indexer_kl(target, scores, selected >= 0)


def _block_kl(
    q_i: torch.Tensor, k_i: torch.Tensor, w_i: torch.Tensor, q: torch.Tensor, k: torch.Tensor, start: int
) -> torch.Tensor:
    """KL over all causal keys for one block of queries (see `blockwise_causal_kl`); (B, Tb)."""
    Tb, S = q_i.shape[1], k_i.shape[1]
    t = start + torch.arange(Tb, device=q_i.device)[:, None]  # (Tb, 1)
    causal = torch.arange(S, device=q_i.device)[None, :] <= t  # (Tb, S)
    # Both distributions in float32 (under autocast the matmuls return bfloat16): a target
    # normalised in bfloat16 sums to 1 only within ~2^-8, and the KL then drops below 0.
    scores = block_index_scores(q_i, k_i, w_i, start).float()  # (B, Tb, S); -inf on future keys
    with torch.no_grad():  # target: main attention of the block's queries, summed over heads
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, Tb, S)
        p = logits.masked_fill_(~causal, float("-inf")).softmax(dim=-1).sum(1)  # (B, Tb, S); 0 on future keys
        p = p / p.sum(dim=-1, keepdim=True)  # L1-normalised: every row has a key (its own)
        p_log_p = torch.xlogy(p, p).sum(dim=-1)  # (B, Tb); 0 log 0 = 0
    # `indexer_kl` on rows whose valid keys are exactly the causal ones, with fewer passes: every
    # row has a key, and its scores are finite on the causal keys and -inf on the future ones.
    log_q = torch.log_softmax(scores, dim=-1)  # (B, Tb, S)
    return p_log_p - (p * log_q.masked_fill(~causal, 0.0)).sum(dim=-1)  # (B, Tb) KL(p || q)


def blockwise_causal_kl(
    q_i: torch.Tensor,
    k_i: torch.Tensor,
    w_i: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = INDEXER_BLOCK,
    recompute: bool = True,
) -> torch.Tensor:
    """Per-row KL(p_t || softmax(I_t)) over all causal keys, by query blocks (the warm-up loss).

    p_t = the main attention of query t (dense, causal) summed over heads, as the full path's
    `causal_attention_probs(q, k).sum(1)`; it carries no gradient. Each block is checkpointed:
    backward recomputes its scores, so at most one block's (B, block, H_I, T) logits exist.

    Args:
        q_i: (B, T, H_I, d_I), k_i: (B, T, d_I), w_i: (B, T, H_I) from `LightningIndexer.project`.
        q, k: (B, H, T, hd) the main attention's rotated queries and keys (detached here).
        block_size: queries per block (> 0).
        recompute: checkpoint each block (backward recomputes it: one block's logits alive at a
            time). False keeps every block's graph (about half the full path's (B, T, H_I, T)
            logits, since a block reads only keys up to its last query) and computes each
            block's target once: faster where that memory is affordable.

    Returns:
        (B, T) float32 KL per query row, differentiable in q_i, k_i and w_i.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    T = q_i.shape[1]
    q, k = q.detach(), k.detach()
    rows = []
    for start in range(0, T, block_size):
        end = min(start + block_size, T)
        args = (q_i[:, start:end], k_i[:, :end], w_i[:, start:end], q[:, :, start:end], k[:, :, :end], start)
        if recompute and torch.is_grad_enabled() and any(x.requires_grad for x in (q_i, k_i, w_i)):
            rows.append(checkpoint(_block_kl, *args, use_reentrant=False))
        else:
            rows.append(_block_kl(*args))
    return torch.cat(rows, dim=1)  # (B, T)
