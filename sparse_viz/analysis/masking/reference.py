"""The readable reference for token masking: one call of the model's own layer per masked key.

For layer L and key j, layer L is called alone on its cached input (REFERENCE §2: keyword
arguments, the model's position embeddings) with an additive 4D mask that is causal (and
sliding-window where the layer has one) and also hides key j from the final query. Forward
hooks read the attention output after o_proj and o_proj's input z. This is seed 000's method
(cached layer inputs, one layer pass per masked token): exact by construction, T times slower
than `final_position.masked_final_position_updates`, whose results it must reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparse_viz.analysis.masking.all_pairs import AllPairsImpact
from sparse_viz.analysis.masking.final_position import FinalPositionUpdates
from sparse_viz.analysis.masking.layer_inputs import LayerInput
from sparse_viz.pretrained.adapter import ArchitectureAdapter


def additive_mask(
    n_tokens: int,
    masked_key: int | None,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    mask_value: float | None = None,
    masked_query: int = -1,
) -> torch.Tensor:
    """Causal additive attention mask, with one key hidden from one query (the final one by default).

    Args:
        n_tokens: sequence length T.
        masked_key: key position hidden from the final query, or None for the plain mask.
        window: sliding window (q - k < window visible), or None.
        dtype, device: of the mask (the model's dtype: eager attention adds it to the scores).
        mask_value: value at hidden entries (default: the dtype's most negative number, like
            transformers' own masks).
        masked_query: the query `masked_key` is hidden from.

    Returns:
        (1, 1, T, T) float mask: 0 where visible, `mask_value` where hidden.
    """
    hidden_value = torch.finfo(dtype).min if mask_value is None else mask_value
    query = torch.arange(n_tokens, device=device)[:, None]
    key = torch.arange(n_tokens, device=device)[None, :]
    hidden = key > query  # (T, T) future keys
    if window is not None:
        hidden |= (query - key) >= window
    if masked_key is not None:
        hidden[masked_query, masked_key] = True
    mask = torch.zeros(n_tokens, n_tokens, dtype=dtype, device=device)
    mask.masked_fill_(hidden, hidden_value)
    return mask[None, None]  # (1, 1, T, T)


@torch.no_grad()
def reference_final_position_updates(
    adapter: ArchitectureAdapter,
    layer: int,
    layer_input: LayerInput,
    positions: Sequence[int],
) -> FinalPositionUpdates:
    """Same contract as `final_position.masked_final_position_updates`, by brute force.

    Args:
        adapter: the model's adapter.
        layer: layer index.
        layer_input: the layer's cached input and the keyword arguments the model passed to it.
        positions: P key positions; row 1+p of the result has key positions[p] masked.

    Returns:
        FinalPositionUpdates with 1+P rows (row 0: the plain causal mask).
    """
    decoder_layer = adapter.layers[layer]
    attention = adapter.attention(layer)
    hidden = layer_input.hidden  # (1, T, D)
    n_tokens = hidden.shape[1]
    n_heads, head_dim = adapter.n_heads, adapter.head_dim
    window = adapter.sliding_window(layer)

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attention.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out[0][0, -1])),
        attention.o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0][0, -1])),
    ]
    full, attn, heads = [], [], []
    try:
        for masked_key in [None, *positions]:
            mask = additive_mask(n_tokens, masked_key, window, hidden.dtype, hidden.device)
            kwargs = {**layer_input.kwargs, "attention_mask": mask}
            output = decoder_layer(hidden, **kwargs)  # (1, T, D)
            full.append(output[0, -1] - hidden[0, -1])  # (D,)
            attn.append(seen["attn"])  # (D,)
            z = seen["z"]  # (H*hd,)
            w_o = attention.o_proj.weight  # (D, H*hd)
            # Head h's contribution: its column block of o_proj applied to its slice of z.
            heads.append(
                torch.stack(
                    [w_o[:, h * head_dim : (h + 1) * head_dim] @ z[h * head_dim : (h + 1) * head_dim] for h in range(n_heads)]
                )
            )  # (H, D)
    finally:
        for hook in hooks:
            hook.remove()
    return FinalPositionUpdates(full=torch.stack(full), attn=torch.stack(attn), heads=torch.stack(heads))


@torch.no_grad()
def reference_all_pairs_impact(adapter: ArchitectureAdapter, layer: int, layer_input: LayerInput) -> AllPairsImpact:
    """Same contract as `all_pairs.all_pairs_attention_impact`, by brute force: for every query t
    and key s <= t, the whole layer is called again with an additive mask that also hides s from
    t, and the attention block's output at t (after o_proj) is compared with the unmasked one.

    Returns:
        AllPairsImpact; distances in float64 of the float32 outputs, NaN for s > t and t = s = 0;
        attention_mass from the unmasked call's attention weights, summed over heads.
    """
    decoder_layer = adapter.layers[layer]
    hidden = layer_input.hidden  # (1, T, D)
    n_tokens = hidden.shape[1]
    window = adapter.sliding_window(layer)
    seen: dict[str, torch.Tensor] = {}
    hook = adapter.attention(layer).register_forward_hook(lambda m, args, out: seen.update(attn=out[0][0], weights=out[1][0]))

    def attention_output(query: int, masked_key: int | None) -> torch.Tensor:
        mask = additive_mask(n_tokens, masked_key, window, hidden.dtype, hidden.device, masked_query=query)
        decoder_layer(hidden, **{**layer_input.kwargs, "attention_mask": mask})
        return seen["attn"][query].double()  # (D,)

    l2 = torch.full((n_tokens, n_tokens), float("nan"), dtype=torch.float64)
    cosine = torch.full((n_tokens, n_tokens), float("nan"), dtype=torch.float64)
    try:
        attention_output(0, None)
        mass = seen["weights"].float().sum(0)  # (T, T): the unmasked layer's attention, summed over heads
        for t in range(1, n_tokens):  # query 0 has one key: hiding it leaves nothing to attend to
            base = attention_output(t, None)
            for s in range(t + 1):
                masked = attention_output(t, s)
                l2[t, s] = (masked - base).norm()
                cosine[t, s] = 1 - (masked @ base) / (masked.norm() * base.norm())
    finally:
        hook.remove()
    return AllPairsImpact(l2=l2, cosine=cosine, attention_mass=mass)
