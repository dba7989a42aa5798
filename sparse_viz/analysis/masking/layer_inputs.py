"""One baseline forward that keeps what every layer received, so a layer can run again alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparse_viz.pretrained.adapter import ArchitectureAdapter


@dataclass
class LayerInput:
    """What layer i received in the baseline forward.

    Attributes:
        hidden: (1, T, D) the layer's input hidden states.
        kwargs: the keyword arguments the model passed to the layer (position_embeddings,
            attention_mask, position_ids, ...), so the layer can be called again alone.
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any]

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (1, T, hd)."""
        return self.kwargs["position_embeddings"]


@torch.no_grad()
def capture_layer_inputs(
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    model_inputs: dict[str, Any] | None = None,
) -> tuple[dict[int, LayerInput], torch.Tensor]:
    """Run the model once; return the inputs of `layers` and the final position's logits.

    Pre-hooks (not `hidden_states`) because Qwen3-VL adds DeepStack features between layers and
    `hidden_states[-1]` already has the final norm applied.

    Args:
        adapter: the model's adapter.
        input_ids: (1, T) token ids on the model's device.
        layers: layer indices to capture (default all).
        model_inputs: extra keyword arguments for the model's forward (Qwen3-VL: pixel_values,
            image_grid_thw, mm_token_type_ids, position_ids; see `analysis.vision`).

    Returns:
        ({layer: LayerInput}, logits (V,) at the final position).
    """
    wanted = set(range(adapter.n_layers) if layers is None else layers)
    captured: dict[int, LayerInput] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = LayerInput(hidden=hidden.detach(), kwargs=dict(kwargs))

        return hook

    handles = [
        adapter.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in sorted(wanted)
    ]
    try:
        output = adapter.model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **(model_inputs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return captured, output.logits[0, -1]
