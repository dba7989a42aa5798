"""All-pairs attention impact: for every query t and key s <= t of a layer, how much the attention
block's output at t (after o_proj) changes when key s alone is hidden from query t.

Hiding key s from query t rescales only that row's softmax, so per head h (p = p_h[t, s],
z_h = the head's output at t, v_s = its value at s, z_h^(-s) = the output renormalised without s):

    dz_h = z_h^(-s) - z_h = p (z_h^(-s) - v_s) = p / (1 - p) * (z_h - v_s)
    da   = sum_h W_o[:, h] dz_h                              (o_proj's bias cancels)

Two ways to evaluate it for every pair without a forward per pair:

- Where no head puts more than half its mass on s, c_h = p / (1 - p) <= 1 and the right-hand
  form is stable. Then |da|^2 = sum_{h,k} c_h c_k (A_h - U_h) . (A_k - U_k) with A_h = W_o,h z_h(t)
  and U_h = W_o,h v_s, whose inner products come from the small matrices M_hk = W_o,h^T W_o,k
  (head_dim x head_dim): H^2 numbers per pair instead of a hidden-size vector, in float64 so
  that the expanded products do not cancel.
- Where a head puts more than half its mass on s (attention sinks: p -> 1), p / (1 - p) blows up
  and z_h - v_s cancels; those pairs (at most one key per query and head) are computed as
  vectors, from the softmax recomputed without s: exact.

The distances match the final-position masking path's "Attn" variant (`final_position.py`),
which is the last row of this matrix:
    l2_distance     = |da|
    cosine_distance = 1 - cos(a, a + da),  a = the unmasked attention output at t
The readable reference, one layer call per (t, s) with an explicit additive mask, is
`reference.reference_all_pairs_impact`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_viz.analysis.masking.layer_attention import LayerAttention, layer_attention
from sparse_viz.analysis.masking.layer_inputs import LayerInput
from sparse_viz.pretrained.adapter import ArchitectureAdapter

DOMINANT = 0.5  # above this share of a row's mass, a key is handled by the exact vector path


@dataclass
class AllPairsImpact:
    """One layer's impact matrices.

    Attributes:
        l2: (T, T) float32, |da| of query t (row) when key s (column) is hidden from it.
        cosine: (T, T) float32, 1 - cos(a, a + da).
            Both are NaN for s > t and where hiding s leaves the query no key at all (t = 0), and
            0 for keys outside the layer's sliding window (the query never sees them).
        attention_mass: (T, T) float32, the layer's attention probabilities summed over query
            heads (the softmax the impact is computed from; 0 for keys a query does not see).
    """

    l2: torch.Tensor
    cosine: torch.Tensor
    attention_mass: torch.Tensor


@torch.no_grad()
def all_pairs_attention_impact(
    adapter: ArchitectureAdapter, layer: int, layer_input: LayerInput, block_size: int = 64
) -> AllPairsImpact:
    """The impact of hiding each key from each query, for layer `layer`, a query block at a time.

    Args:
        adapter: the model's adapter.
        layer: layer index.
        layer_input: the layer's cached input (hidden (1, T, D), position embeddings).
        block_size: queries per block; memory grows as block_size * T * H^2 (float64).

    Returns:
        AllPairsImpact with (T, T) matrices on the CPU.
    """
    n_tokens = layer_input.hidden.shape[1]
    o_proj = adapter.attention(layer).o_proj
    n_heads, head_dim = adapter.n_heads, adapter.head_dim
    w_o = o_proj.weight.double().view(-1, n_heads, head_dim)  # (D, H, hd)
    m = torch.einsum("Dhd,Dke->hkde", w_o, w_o)  # (H, H, hd, hd): M_hk = W_o,h^T W_o,k
    bias = o_proj.bias.double() if o_proj.bias is not None else None
    att = layer_attention(adapter, layer, layer_input)
    v_of_head = att.v.double().repeat_interleave(n_heads // adapter.n_kv_heads, dim=0)  # (H, T, hd)
    uu = _value_gram(v_of_head, m)  # (T, H, H)
    l2 = torch.full((n_tokens, n_tokens), float("nan"))
    cosine = torch.full((n_tokens, n_tokens), float("nan"))
    mass = torch.zeros(n_tokens, n_tokens)
    for start in range(0, n_tokens, block_size):
        stop = min(start + block_size, n_tokens)
        block_l2, block_cos, block_mass = _block_impact(att.queries(start, stop), w_o, m, bias, start,
                                                        v_of_head[:, :stop], uu[:stop])
        l2[start:stop, :stop] = block_l2.float().cpu()
        cosine[start:stop, :stop] = block_cos.float().cpu()
        mass[start:stop, :stop] = block_mass.cpu()
    return AllPairsImpact(l2=l2, cosine=cosine, attention_mass=mass)


def _value_gram(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """U_h(s) . U_k(s) = v_h(s)^T M_hk v_k(s) for every key: (T, H, H), from v (H, T, hd)."""
    vm = torch.einsum("hsd,hkde->shke", v, m)  # (T, H, H, hd)
    return (vm * v.permute(1, 0, 2)[:, None]).sum(-1)  # (T, H, H)


def _block_impact(att: LayerAttention, w_o: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None,
                  start: int, v_of_head: torch.Tensor, uu: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l2 and cosine distances (b, stop) of a query block, NaN above the diagonal, and its
    attention probabilities summed over heads (b, stop).

    Args:
        v_of_head: (H, stop, hd) float64, the values each head reads; uu: (stop, H, H) `_value_gram`.
    """
    n_kv, group, b, _ = att.q.shape
    n_heads = n_kv * group
    stop = start + b
    keys = slice(0, stop)  # later keys are in every query's future
    scores = att.scores()[..., keys].float()  # (Hkv, G, b, S): softmax in float32, as eager attention
    p = F.softmax(scores, dim=-1)  # (Hkv, G, b, S)
    mass = p.sum((0, 1))  # (b, S)
    z = torch.einsum("kgqs,ksd->kgqd", p.to(att.v.dtype), att.v[:, keys]).double()  # (Hkv, G, b, hd)
    p = p.double().reshape(n_heads, b, -1)  # (H, b, S); head h = kv * G + g
    z = z.reshape(n_heads, b, -1)  # (H, b, hd)

    dominant = p > DOMINANT  # (H, b, S)
    c = torch.where(dominant, torch.zeros_like(p), p / (1 - p))  # (H, b, S), <= 1
    norm2 = _gram_norm2(c, z, v_of_head, m, uu, n_kv, group)  # (b, S): |da|^2 without dominant heads
    a = torch.einsum("Dhd,hqd->qD", w_o, z)  # (b, D) attention output minus bias
    if bias is not None:
        a = a + bias
    r = torch.einsum("Dhd,qD->hqd", w_o, a)  # (H, b, hd): W_o,h^T a
    # a . da = sum_h c_h (a . A_h - a . U_h(s)), with a . A_h = r_h . z_h and a . U_h(s) = r_h . v_h(s)
    r_dot_v = torch.bmm(r, v_of_head.transpose(1, 2))  # (H, b, S)
    a_dot_da = (c * ((r * z).sum(-1)[..., None] - r_dot_v)).sum(0)  # (b, S)

    l2, cosine = _distances(a, a_dot_da, norm2)
    _exact_dominant_pairs(scores.reshape(n_heads, b, -1), dominant, p, c, z, v_of_head, w_o, a, l2, cosine)
    future = torch.arange(stop, device=l2.device)[None, :] > torch.arange(start, stop, device=l2.device)[:, None]
    return l2.masked_fill(future, float("nan")), cosine.masked_fill(future, float("nan")), mass


def _gram_norm2(c: torch.Tensor, z: torch.Tensor, v: torch.Tensor, m: torch.Tensor, uu: torch.Tensor, n_kv: int,
                group: int) -> torch.Tensor:
    """|sum_h c_h W_o,h (z_h - v_s)|^2 for every (query, key), through M_hk = W_o,h^T W_o,k.

    Args:
        c: (H, b, S) per-head weights; z: (H, b, hd) head outputs; v: (H, S, hd) values per head;
        m: (H, H, hd, hd); uu: (S, H, H) U_h(s) . U_k(s).

    Returns:
        (b, S) float64.
    """
    n_heads, b, n_keys = c.shape
    cq = c.permute(1, 2, 0)  # (b, S, H)
    # sum_hk c_h c_k A_h . A_k: a (H, H) form per query; sum_hk c_h c_k U_h . U_k: one per key.
    zm = torch.einsum("hqd,hkde->qhke", z, m)  # (b, H, H, hd): row z_h^T M_hk
    aa = (zm * z.permute(1, 0, 2)[:, None]).sum(-1)  # (b, H, H)
    norm2 = (torch.bmm(cq, aa) * cq).sum(-1)  # (b, S)
    norm2 += (torch.bmm(cq.transpose(0, 1), uu) * cq.transpose(0, 1)).sum(-1).T  # (b, S)
    # sum_hk c_h c_k A_h . U_k(s), A_h . U_k(s) = (z_h^T M_hk) . v_k(s): one product per KV group of k.
    zm_by_kv = zm.view(b, n_heads, n_kv, group, -1).permute(2, 0, 1, 3, 4).reshape(n_kv, b * n_heads * group, -1)
    kv_values = v.view(n_kv, group, n_keys, -1)[:, 0]  # (Hkv, S, hd)
    au = torch.bmm(zm_by_kv, kv_values.transpose(1, 2)).view(n_kv, b, n_heads, group, n_keys)  # [j, q, h, g, s]
    inner = (au * c.permute(1, 0, 2)[None, :, :, None, :]).sum(2)  # (Hkv, b, G, S): sum_h c_h A_h . U_k
    norm2 -= 2 * (inner * c.view(n_kv, group, b, n_keys).transpose(1, 2)).sum((0, 2))  # (b, S)
    return norm2.clamp_min(0)


def _distances(a: torch.Tensor, a_dot_da: torch.Tensor, norm2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2, cosine distance) from |a|, a . da and |da|^2, each (b, S) float64."""
    a_norm2 = (a * a).sum(-1, keepdim=True)  # (b, 1)
    new_norm = (a_norm2 + 2 * a_dot_da + norm2).clamp_min(0).sqrt()  # |a + da|
    cos = (a_norm2 + a_dot_da) / (a_norm2.sqrt() * new_norm).clamp_min(torch.finfo(torch.float64).tiny)
    return norm2.sqrt(), (1 - cos).clamp_min(0)


def _exact_dominant_pairs(scores: torch.Tensor, dominant: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                          z: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor, a: torch.Tensor,
                          l2: torch.Tensor, cosine: torch.Tensor) -> None:
    """Overwrite l2/cosine (b, S) of every pair where some head holds > DOMINANT of its mass on the
    key, from da as a vector: those heads from the softmax recomputed without the key.

    Args:
        scores: (H, b, S) float32 block scores (-inf at hidden keys); p, c, dominant: (H, b, S);
        z: (H, b, hd); v: (H, S, hd) the values each head reads; w_o: (D, H, hd); a: (b, D).
    """
    pairs = dominant.any(0).nonzero()  # (P, 2): (query in block, key)
    if len(pairs) == 0:
        return
    # Each (query, head) row has at most one dominant key: its softmax without that key.
    key_of_row = torch.where(dominant.any(-1), p.argmax(-1), -1)  # (H, b)
    without = scores.scatter(-1, key_of_row.clamp_min(0)[..., None], float("-inf"))
    p_without = F.softmax(without, dim=-1).double()  # (H, b, S); NaN if nothing is left
    z_without = torch.einsum("hqs,hsd->hqd", p_without, v)  # (H, b, hd)

    q_idx, s_idx = pairs[:, 0], pairs[:, 1]
    p_pair = p[:, q_idx, s_idx]  # (H, P)
    v_pair = v[:, s_idx]  # (H, P, hd)
    is_dom = dominant[:, q_idx, s_idx][..., None]  # (H, P, 1)
    dz = torch.where(is_dom, p_pair[..., None] * (z_without[:, q_idx] - v_pair),
                     c[:, q_idx, s_idx][..., None] * (z[:, q_idx] - v_pair))  # (H, P, hd)
    da = torch.einsum("Dhd,hpd->pD", w_o, dz)  # (P, D)
    a_pair = a[q_idx]  # (P, D)
    new = a_pair + da
    cos = (a_pair * new).sum(-1) / (a_pair.norm(dim=-1) * new.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)
    l2[q_idx, s_idx] = da.norm(dim=-1)
    cosine[q_idx, s_idx] = (1 - cos).clamp_min(0)
