"""Token masking impact (seed 000), exact and fast.

Question: at layer L, how much does the final position's residual-stream update change when
the final query may not attend to key j? Masking key j for the final query at layer L changes
only the final position of layer L (earlier queries and other layers are untouched), so from
one baseline forward that caches every layer's input, the masked updates of ALL keys j come
from one batched computation per layer:

    scores  s = q_last . K^T * scaling                       (H, T)
    S[p]    = s with key positions[p] set to -inf            (H, 1+P, T)  row 0: nothing masked
    z       = softmax(S) @ V                                 (1+P, H, hd)
    Attn    = o_proj(z);  Head_h = z_h @ W_o[:, h*hd:(h+1)*hd]^T
    Full    = (h + Attn + MLP(post_norm(h + Attn))) - h      MLP batched over the 1+P rows

The masked rows are computed directly, not as `(o - p_j v_j) / (1 - p_j)`: that subtraction
cancels catastrophically when one key holds ~all the mass (attention sinks). The readable
brute-force path (`method="reference"`, one layer call per masked key with an additive 4D
mask) is `reference.py`; the experiment around both (generation steps, rows) is `experiment.py`.

Distances between baseline (row 0) and masked rows, per variant, at the final position:
`l2_distance = ||d_base - d_masked||_2` and `cosine_distance = 1 - cos(d_base, d_masked)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparse_viz.analysis.masking.layer_attention import layer_attention
from sparse_viz.analysis.masking.layer_inputs import LayerInput
from sparse_viz.pretrained.adapter import ArchitectureAdapter


@dataclass
class FinalPositionUpdates:
    """Updates of the residual stream at the final position; row 0 = baseline (no key masked),
    row 1+p = key `positions[p]` masked.

    Attributes:
        full: (1+P, D) layer output - layer input.
        attn: (1+P, D) attention output after o_proj.
        heads: (1+P, H, D) each query head's contribution (its o_proj column block times z_h).
    """

    full: torch.Tensor
    attn: torch.Tensor
    heads: torch.Tensor


@torch.no_grad()
def masked_final_position_updates(
    adapter: ArchitectureAdapter,
    layer: int,
    layer_input: LayerInput,
    positions: Sequence[int],
    mask_value: float = float("-inf"),
) -> FinalPositionUpdates:
    """Layer `layer`'s final-position updates with each key of `positions` masked, all at once.

    Args:
        adapter: the model's adapter.
        layer: layer index.
        layer_input: the layer's cached input (hidden (1, T, D) and position embeddings).
        positions: P key positions to mask, one per masked row.
        mask_value: added to the masked key's score; -inf masks it, 0.0 is the identity mask
            (every row then equals the baseline row bit for bit: used by the tests).

    Returns:
        FinalPositionUpdates with 1+P rows (row 0 = baseline).
    """
    attention = adapter.attention(layer)
    hidden = layer_input.hidden  # (1, T, D)
    n_heads, head_dim = adapter.n_heads, adapter.head_dim
    last = layer_attention(adapter, layer, layer_input, queries=slice(-1, None))  # the final query only
    scores = last.scores()[:, :, 0]  # (Hkv, G, T)
    v = last.v[None]  # (1, Hkv, T, hd)

    n_rows = 1 + len(positions)
    rows = scores.unsqueeze(2).repeat(1, 1, n_rows, 1)  # (Hkv, G, 1+P, T)
    row_index = torch.arange(1, n_rows, device=hidden.device)
    key_index = torch.as_tensor(list(positions), dtype=torch.long, device=hidden.device)
    # The diagonal of the [P, T] block: row 1+p loses key positions[p]. Added like the model's
    # additive mask, so mask_value=0.0 is an exact identity through the same code path.
    rows[:, :, row_index, key_index] += mask_value
    # Softmax in float32 as the eager attention does, then back to the model's dtype.
    probs = F.softmax(rows, dim=-1, dtype=torch.float32).to(v.dtype)  # (Hkv, G, 1+P, T)
    z = torch.einsum("kgrt,ktd->rkgd", probs, v[0])  # (1+P, Hkv, G, hd)
    z = z.reshape(n_rows, n_heads * head_dim)  # (1+P, H*hd) head-major, as o_proj expects

    attn = attention.o_proj(z)  # (1+P, D)
    w_o = attention.o_proj.weight.view(-1, n_heads, head_dim)  # (D, H, hd)
    heads = torch.einsum("rhd,Dhd->rhD", z.view(n_rows, n_heads, head_dim), w_o)  # (1+P, H, D)

    residual = hidden[0, -1]  # (D,)
    mid = residual + attn  # (1+P, D)
    out = mid + adapter.mlp(layer)(adapter.post_attention_norm(layer)(mid))  # (1+P, D)
    return FinalPositionUpdates(full=out - residual, attn=attn, heads=heads)


def variant_names(n_heads: int) -> list[str]:
    return ["Full", "Attn"] + [f"Head_{h}" for h in range(n_heads)]


def update_distances(updates: FinalPositionUpdates) -> tuple[np.ndarray, np.ndarray]:
    """L2 and cosine distances of every masked row to the baseline row, per variant.

    Returns:
        (l2, cosine), each (P, 2+H) float64: columns Full, Attn, Head_0..Head_{H-1}.
    """
    stacked = torch.cat([updates.full[:, None], updates.attn[:, None], updates.heads], dim=1)  # (1+P, V, D)
    stacked = stacked.double()
    base, masked = stacked[:1], stacked[1:]  # (1, V, D), (P, V, D)
    l2 = (masked - base).norm(dim=-1)  # (P, V)
    # 1 - cos as half the squared distance of unit vectors: no cancellation near cos = 1,
    # and exactly 0 when the vectors are identical.
    tiny = torch.finfo(torch.float64).tiny
    unit_base = base / base.norm(dim=-1, keepdim=True).clamp_min(tiny)
    unit_masked = masked / masked.norm(dim=-1, keepdim=True).clamp_min(tiny)
    cosine = 0.5 * (unit_masked - unit_base).pow(2).sum(dim=-1)  # (P, V)
    return l2.cpu().numpy(), cosine.cpu().numpy()
