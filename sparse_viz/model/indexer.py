"""The Lightning Indexer of DeepSeek Sparse Attention (REFERENCE §1, Eq. 1).

    I[t, s] = sum_j  w[t, j] * ReLU(q_I[t, j] . k_I[s]) * d_I**-0.5       (s <= t; else -inf)

with q_I = W_q(x_t) as (H_I, d_I), ONE key k_I = LayerNorm(W_k(x_s)) of size d_I shared by all
indexer heads, and w = W_w(x_t) * H_I**-0.5 (a raw linear output, no softmax). RoPE is applied
to the first `indexer_rope_dim` dims of q_I and k_I in the non-interleaved layout. The Hadamard
rotation and FP8 quantisation of the reference code are inference tricks and are left out.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .rope import apply_partial_rope


class LightningIndexer(nn.Module):
    """Scores every past key for every query; its input is always detached.

    Detaching inside `forward` (not at the call site) makes it impossible for the indexer to
    push gradient into the main model: it learns only from its own KL loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.indexer_heads
        self.head_dim = config.indexer_dim
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.indexer_norm_eps)
        self.ww = nn.Linear(config.d_model, self.n_heads, bias=False)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The indexer's queries, its one shared key and its head weights, from a detached input.

        Eq. 1 is then I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) for s <= t: `forward`
        evaluates it for every pair (the readable reference), `indexer_blocks.py` by query
        blocks or at selected keys only.

        Args:
            x: (B, T, d_model) layer input (the normed residual stream); detached here.
            cos, sin: (T, indexer_rope_dim / 2) RoPE tables.

        Returns:
            q: (B, T, H_I, d_I) rotated queries.
            k: (B, T, d_I) rotated, LayerNormed keys.
            w: (B, T, H_I) head weights with the H_I**-0.5 and d_I**-0.5 scales folded in
                (ReLU(x) * c == ReLU(x * c) for c > 0, which saves a pass over the logits).
        """
        x = x.detach()
        if torch.is_autocast_enabled(x.device.type):
            # Autocast would cast x for each of the three projections, and each copy is kept for
            # backward: one cast, shared, is the same numbers in a third of the memory.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H_I, d_I)
        k = self.k_norm(self.wk(x))  # (B, T, d_I)
        q = apply_partial_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)  # (B, T, H_I, d_I)
        k = apply_partial_rope(k, cos, sin)
        w = self.ww(x) * (self.n_heads**-0.5 * self.head_dim**-0.5)  # (B, T, H_I)
        return q, k, w

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        return_head_terms: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Index scores of all (query, key) pairs: the readable full-matrix reference.

        Holds (B, T, H_I, T) logits and a (B, T, T) score matrix; `indexer_blocks.py` computes
        the same selection and losses by query blocks without them (`ModelConfig.indexer_path`).

        Args:
            x: (B, T, d_model) layer input (the normed residual stream); detached here.
            cos, sin: (T, indexer_rope_dim / 2) RoPE tables.
            return_head_terms: also return the per-head terms that sum to I.

        Returns:
            scores: (B, T, T) float, I[t, s]; -inf for s > t.
            head_terms: (B, H_I, T, T) or None; w[t,j] * ReLU(q_I[t,j] . k_I[s]) * d_I**-0.5,
                zero for s > t.
        """
        B, T, _ = x.shape
        q, k, w = self.project(x, cos, sin)  # (B, T, H_I, d_I), (B, T, d_I), (B, T, H_I)

        # Query-major layout (B, T, H_I, T), so the weighted head sum is one contiguous batched product.
        # One (T*H_I, d_I) @ (d_I, T) product per sequence: the key is shared by all heads.
        logits = torch.relu(q.reshape(B, T * self.n_heads, self.head_dim) @ k.transpose(1, 2))  # (B, T*H_I, T)
        logits = logits.view(B, T, self.n_heads, T)  # (B, T, H_I, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        scores = (w[:, :, None, :] @ logits).squeeze(2)  # (B, T, T)
        scores = scores.masked_fill(future, float("-inf"))
        head_terms = None
        if return_head_terms:
            head_terms = (logits * w[..., None]).transpose(1, 2)  # (B, H_I, T, T)
            head_terms = head_terms.masked_fill(future, 0.0)
        return scores, head_terms


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || softmax(I)) over each row's valid keys (the indexer's training loss).

    Both distributions are restricted to, and renormalised over, the valid keys of the row: the
    causal keys in the warm-up stage, the selected set S_t in the sparse stage. Keys whose score
    is -inf count as invalid. Computed with `log_softmax` on the masked row (never
    `softmax().log()`), and a row with no valid key contributes 0, so the result is always finite.

    Args:
        target: (B, T, K) non-negative weights p (main attention summed over heads); detached here.
        scores: (B, T, K) index scores I at the same keys.
        valid: (B, T, K) or broadcastable bool.

    Returns:
        (B, T) float32 KL per query row.
    """
    scores = scores.float()
    valid = valid & torch.isfinite(scores)
    row_has_keys = valid.any(dim=-1, keepdim=True)  # (B, T, 1)
    # A row with no valid key would be all -inf and give NaN in log_softmax; it gets zeros instead.
    masked_scores = scores.masked_fill(~valid, float("-inf")).masked_fill(~row_has_keys, 0.0)
    log_q = torch.log_softmax(masked_scores, dim=-1)  # (B, T, K)
    p = target.detach().float().masked_fill(~valid, 0.0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # L1-normalised
    support = p > 0
    log_p = torch.where(support, p, torch.ones_like(p)).log()
    terms = torch.where(support, p * (log_p - log_q.masked_fill(~support, 0.0)), torch.zeros_like(p))
    return terms.sum(dim=-1)
