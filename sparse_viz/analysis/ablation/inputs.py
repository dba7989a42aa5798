"""What every ablation starts from: the bare model, its tokenizer, and a padded batch of ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.prompts import encode_prompts


def ablation_inputs(
    model: Any,
    prompts: str | Sequence[str] | torch.Tensor,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor | None]:
    """Unwrap a `LoadedModel` and turn prompts into the (N, T) batch an ablation runs on.

    Args:
        model: a Hugging Face causal LM, or a `LoadedModel` (its tokenizer is then the default).
        prompts: one prompt, several prompts (batch items, right-padded), or ids (T,) / (N, T).
        tokenizer: needed for text prompts unless `model` brings one.
        attention_mask: (N, T) right padding of tensor `prompts` (text prompts make their own).

    Returns:
        (model, tokenizer, input_ids (N, T), attention_mask (N, T) or None when nothing is padded),
        on the model's device.

    Raises:
        UserInputError: text prompts without a tokenizer, or an empty prompt.
    """
    if hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        input_ids = prompts.to(device)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids  # (N, T)
        return model, tokenizer, input_ids, None if attention_mask is None else attention_mask.to(device)
    if tokenizer is None:
        raise UserInputError("text prompts need a tokenizer")
    input_ids, attention_mask = encode_prompts(tokenizer, [prompts] if isinstance(prompts, str) else list(prompts), device)
    return model, tokenizer, input_ids, None if bool(attention_mask.all()) else attention_mask
