"""What one layer can report about its attention, returned only when asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionTrace:
    """One layer's attention on one forward pass (all tensors detached).

    Shapes: B batch, T sequence, k = min(top_k, T), H main heads, H_I indexer heads.

    Attributes:
        selected: (B, T, k) long, the key indices each query attends to, or None when the
            layer attended densely. Slots a short row (t + 1 < k) cannot fill hold -1.
        index_scores: (B, T, T) float, the Lightning Indexer's I[t, s] (future = -inf), or
            None when the layer has no indexer.
        index_head_terms: (B, H_I, T, T) float, per indexer head j the term
            w[t, j] * ReLU(q_I[t, j] . k_I[s]) * d_I**-0.5 whose sum over j is I; None unless
            asked for (`trace="full"`) and an indexer exists.
        attn_probs: (B, H, T, T) float, the main attention probabilities actually used
            (zero off the selection); None unless asked for (`trace="full"`).
        dense_attn_probs: (B, H, T, T) float, what dense causal attention would give on the
            same queries/keys (the ground truth for selection quality); None unless asked for.
    """

    selected: torch.Tensor | None
    index_scores: torch.Tensor | None = None
    index_head_terms: torch.Tensor | None = None
    attn_probs: torch.Tensor | None = None
    dense_attn_probs: torch.Tensor | None = None
