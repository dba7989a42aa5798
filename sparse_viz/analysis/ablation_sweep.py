"""The batched sweep engine shared by head and component ablation.

Many ablations, one baseline: the prompt batch (N sequences) is replicated k times along the
batch dim, batch row `a*N + n` carries ablation a on sequence n, and the caller's hooks apply a
per-row edit, so k ablations share one forward. With `reuse_prefix`, each forward starts at the
first layer its ablations touch, from the recorded input of that layer (`forward_from_layer`):
the layers before it cannot change. Every ablation is compared with the same baseline
(`BaselineDistribution`) over ALL positions of ALL sequences.

The reference path (`reuse_prefix=False`, `batch_size=1`) is one full forward per ablation;
both ablation kinds test that the two agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import numpy as np
import torch
from torch import nn

from sparse_viz.analysis.head_ablation import (
    BaselineDistribution,
    LayerInputs,
    forward_from_layer,
    forward_logits,
    prediction_table,
    record_layer_inputs,
    token_text,
)
from sparse_viz.errors import UserInputError

# rows (one ablation per batch row) and T -> context manager that applies them to the model
RowHooks = Callable[[Sequence[Any], int], ContextManager]


@dataclass
class SweepRun:
    """What one sweep measured, before an ablation kind turns it into its own table.

    Attributes:
        metrics: per ablation, the summary of `BaselineDistribution.compare` as floats.
        kl_per_position: (A, N, T) KL(baseline || ablated), NaN on padding.
        predictions: per ablation, the prediction table at the chosen positions.
        baseline_patterns: {layer: (N, H, T, T)} per sequence (empty if not captured).
        ablated_patterns: per ablation, {layer: (N, H, T, T)} at its pattern layers.
        input_ids: (N, T); valid: (N, T) bool; tokens: per sequence, its token strings.
    """

    metrics: list[dict[str, float]]
    kl_per_position: np.ndarray
    predictions: list[list[dict]]
    input_ids: np.ndarray
    valid: np.ndarray
    tokens: list[list[str]]
    baseline_patterns: dict[int, np.ndarray] = field(default_factory=dict)
    ablated_patterns: list[dict[int, np.ndarray]] = field(default_factory=list)


def prediction_pairs(valid: torch.Tensor, positions: Sequence[int] | None) -> list[tuple[int, int]]:
    """(sequence, position) pairs for the prediction table; negative positions count from each end.

    Args:
        valid: (N, T) bool, False on right padding.
        positions: None = the last token of each sequence.
    Raises:
        UserInputError: a position outside some sequence.
    """
    lengths = valid.sum(1).tolist()
    pairs = []
    for n, length in enumerate(lengths):
        for p in (positions if positions is not None else [-1]):
            t = p if p >= 0 else length + p
            if not 0 <= t < length:
                raise UserInputError(f"prediction position {p} out of range for sequence {n} of {length} tokens")
            pairs.append((n, t))
    return pairs


def run_batched_sweep(
    model: nn.Module,
    input_ids: torch.Tensor,
    ablations: Sequence[Any],
    *,
    row_hooks: RowHooks,
    first_layer: Callable[[Any], int],
    pattern_layers: Callable[[Any], Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    tokenizer=None,
    progress: bool = True,
    reuse_prefix: bool = True,
    prefix_hooks: Callable[[], ContextManager] | None = None,
    desc: str = "ablation",
) -> SweepRun:
    """Baseline forward, then every ablation, `batch_size` per forward.

    Args:
        model: HF causal LM (eval mode; any device/dtype).
        input_ids: (N, T) token ids; attention_mask: (N, T) 1 = token, 0 = right padding.
        ablations: anything `row_hooks`, `first_layer` and `pattern_layers` understand.
        row_hooks: (rows, T) -> context that applies rows[r] to batch row r.
        first_layer: the first decoder layer an ablation can change (where its forward may start).
        pattern_layers: the layers whose ablated attention is kept for an ablation.
        reuse_prefix: start each forward at the chunk's first layer (see the module docstring).
        prefix_hooks: edits shared by every ablated run but absent from the baseline (component
            ablation's all-ones reconstruction): the layer inputs are then recorded from a
            forward under them. None = record them during the baseline forward.
    Returns:
        SweepRun.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    N, T = input_ids.shape
    valid = torch.ones(N, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
    pred_pos = prediction_pairs(valid, prediction_positions)

    recorded = LayerInputs()
    record = record_layer_inputs(model, recorded) if reuse_prefix else contextlib.nullcontext()
    with record if prefix_hooks is None else contextlib.nullcontext():
        base_logits, base_attn = forward_logits(model, input_ids, attention_mask, patterns)  # (N, T, V)
    if reuse_prefix and prefix_hooks is not None:
        with prefix_hooks(), record:
            forward_logits(model, input_ids, attention_mask)
    baseline_patterns = {L: a.float().cpu().numpy() for L, a in enumerate(base_attn)} if patterns else {}
    baseline = BaselineDistribution.of(base_logits)

    metrics, kl_rows, ablated_patterns, predictions = [], [], [], []
    bar = tqdm(total=len(ablations), desc=desc, unit="ablation", disable=not progress)
    for i in range(0, len(ablations), batch_size):
        chunk = list(ablations[i:i + batch_size])
        rows = [a for a in chunk for _ in range(N)]  # row a*N + n: ablation a on sequence n
        with row_hooks(rows, T):
            if reuse_prefix:
                start = min(first_layer(a) for a in chunk)
                logits, attn = forward_from_layer(model, start, recorded, len(chunk), patterns)  # (k*N, T, V)
            else:
                mask = None if attention_mask is None else attention_mask.repeat(len(chunk), 1)
                logits, attn_all = forward_logits(model, input_ids.repeat(len(chunk), 1), mask, patterns)  # (k*N, T, V)
                attn = dict(enumerate(attn_all)) if patterns else {}
        for a, ablation in enumerate(chunk):
            ablated = logits[a * N:(a + 1) * N]  # (N, T, V)
            m = baseline.compare(ablated, valid)
            kl_rows.append(torch.where(valid, m["kl"], torch.nan).cpu().numpy())
            metrics.append({name: float(m[name]) for name in
                            ("kl_divergence", "kl_max", "frac_top1_changed", "delta_logprob_top1_mean", "n_positions")})
            predictions.append(prediction_table(base_logits, ablated, pred_pos, tokenizer, input_ids))
            if patterns:
                # layers below the forward's start did not run: their patterns are the baseline's
                ablated_patterns.append({L: attn[L][a * N:(a + 1) * N].float().cpu().numpy() if L in attn
                                         else baseline_patterns[L] for L in pattern_layers(ablation)})
        bar.update(len(chunk))
    bar.close()

    ids_np = input_ids.cpu().numpy()
    lengths = valid.sum(1).tolist()
    return SweepRun(
        metrics=metrics,
        kl_per_position=np.stack(kl_rows) if kl_rows else np.zeros((0, N, T)),
        predictions=predictions, input_ids=ids_np, valid=valid.cpu().numpy(),
        tokens=[[token_text(tokenizer, int(i)) for i in ids_np[n, : lengths[n]]] for n in range(N)],
        baseline_patterns=baseline_patterns, ablated_patterns=ablated_patterns,
    )
