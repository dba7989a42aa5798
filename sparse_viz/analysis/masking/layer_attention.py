"""A layer's attention recomputed from its cached input: queries, keys and values as the model
uses them (after q/k norms and RoPE, GQA-grouped), and which keys each query may see.

The final-position masking path uses the last query only; the all-pairs impact uses every
query, a block at a time. Both then change the scores of single keys and redo the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_viz.analysis.masking.layer_inputs import LayerInput
from sparse_viz.pretrained.adapter import ArchitectureAdapter


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (non-interleaved) RoPE, as in Llama/Qwen: x (B, H, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


def visible_keys(queries: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """Keys each query may attend to under the model's own mask.

    Args:
        queries: (Tq,) query positions.
        n_keys: T.
        window: the layer's sliding window, or None.

    Returns:
        (Tq, T) bool: s <= t, and t - s < window where the layer has one (transformers' rule).
    """
    keys = torch.arange(n_keys, device=queries.device)[None, :]  # (1, T)
    t = queries[:, None]  # (Tq, 1)
    visible = keys <= t
    if window is not None:
        visible &= (t - keys) < window
    return visible


@dataclass
class LayerAttention:
    """One layer's attention inputs for some queries.

    Attributes:
        q: (Hkv, G, Tq, hd) queries, grouped so that query head h = kv * G + g reads KV head kv.
        k, v: (Hkv, T, hd) keys (post-norm, post-RoPE) and values.
        visible: (Tq, T) bool, the keys each query may see.
        scaling: the softmax scale of the scores.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor
    scaling: float

    def queries(self, start: int, stop: int) -> LayerAttention:
        """The same attention for queries start..stop-1 of these (keys and values shared)."""
        return LayerAttention(q=self.q[:, :, start:stop], k=self.k, v=self.v, visible=self.visible[start:stop],
                              scaling=self.scaling)

    def scores(self) -> torch.Tensor:
        """(Hkv, G, Tq, T) scaled scores, -inf at keys the query may not see."""
        scores = torch.einsum("kgqd,ktd->kgqt", self.q, self.k) * self.scaling  # (Hkv, G, Tq, T)
        return scores.masked_fill(~self.visible, float("-inf"))


@torch.no_grad()
def layer_attention(
    adapter: ArchitectureAdapter, layer: int, layer_input: LayerInput, queries: slice = slice(None)
) -> LayerAttention:
    """Recompute layer `layer`'s attention inputs from its cached input (sequence 0).

    Args:
        adapter: the model's adapter.
        layer: layer index.
        layer_input: the layer's cached input hidden (1, T, D) and position embeddings.
        queries: which query positions (a slice of 0..T-1; default all).

    Returns:
        LayerAttention.
    """
    attention = adapter.attention(layer)
    hidden = layer_input.hidden  # (1, T, D)
    _, n_tokens, _ = hidden.shape
    n_heads, n_kv, head_dim = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim
    cos, sin = layer_input.position_embeddings  # (1, T, hd) each
    selection = adapter.selection
    selected = selection is not None and not selection.is_dense(layer)
    # The oracle picks each row's keys from that row's dense attention, so it needs every query;
    # otherwise only the requested queries are projected.
    requested = queries
    if selected and selection.selector == "oracle":
        queries = slice(None)
    query_positions = torch.arange(n_tokens, device=hidden.device)[queries]  # (Tq,)
    n_queries = len(query_positions)

    x = adapter.input_norm(layer)(hidden)  # (1, T, D)
    q = attention.q_proj(x[:, queries]).view(1, n_queries, n_heads, head_dim)  # (1, Tq, H, hd)
    k = attention.k_proj(x).view(1, n_tokens, n_kv, head_dim)  # (1, T, Hkv, hd)
    v = attention.v_proj(x).view(1, n_tokens, n_kv, head_dim)  # (1, T, Hkv, hd)
    q_norm, k_norm = adapter.q_norm(layer), adapter.k_norm(layer)
    if q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    q = apply_rope(q.transpose(1, 2), cos[:, queries], sin[:, queries])  # (1, H, Tq, hd)
    k = apply_rope(k.transpose(1, 2), cos, sin)  # (1, Hkv, T, hd)
    group = n_heads // n_kv
    att = LayerAttention(
        q=q[0].view(n_kv, group, n_queries, head_dim),  # GQA: head h reads KV head h // group
        k=k[0],
        v=v.transpose(1, 2)[0],  # (Hkv, T, hd)
        visible=visible_keys(query_positions, n_tokens, adapter.sliding_window(layer)),
        scaling=adapter.attention_scaling,
    )
    if selected:
        # The model attends only to its selected keys (a DSA model, or a selector installed on a
        # pretrained one): the same selection the model's attention function computes.
        dense_probs = None
        if selection.selector == "oracle":
            dense_probs = torch.softmax(att.scores().float(), dim=-1).reshape(1, n_heads, n_tokens, n_tokens)
        keep = selection.keep(layer, 1, n_tokens, hidden.device, x, dense_probs)[0]  # (T, T)
        att.visible = att.visible & keep[query_positions]
    if queries is not requested:  # all queries were projected for the oracle: keep the requested ones
        start, stop, _ = requested.indices(n_tokens)
        att = att.queries(start, stop)
    return att
