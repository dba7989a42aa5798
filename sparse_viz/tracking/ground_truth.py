"""Selection against a task's ground truth (associative recall): pure functions on tensors.

A task with ground truth says, at each answer position t, which key positions hold what the
answer needs: `ground_truth` (B, T, G) long, G positions per row (-1 = none), and the answer
positions are the rows with any position >= 0. For multi-query associative recall G = 2:
[position of the matching key, position of its value]; only the value's position can carry the
answer under causal attention (the key's position never sees its value), so the headline
numbers use column `VALUE` and the key column is reported beside it.

    hit@k[t]  = 1 if the ground-truth position is among the selected keys of query t
    gt mass[t] = sum over the ground-truth positions of p[t, s], p the head-mean attention

averaged over the answer positions of the batch (every answer position counts, also a short
row t + 1 <= k, which selects everything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sparse_viz.tracking.metrics import head_mean_probs, selection_mask

KEY, VALUE = 0, 1
GT_BASELINES = ("local", "sink_local", "random", "oracle")


def answer_rows(ground_truth: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the answer positions (rows with a ground-truth position)."""
    return (ground_truth >= 0).any(dim=-1)


def ground_truth_hits(selected: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """Whether each ground-truth position is selected.

    Args:
        selected: (B, T, k) long key indices, -1 pads.
        ground_truth: (B, T, G) long positions, -1 = none.

    Returns:
        (B, T, G) bool, False where the ground truth is -1.
    """
    T = selected.shape[1]
    mask = selection_mask(selected, T)  # (B, T, T)
    hits = mask.gather(-1, ground_truth.clamp(min=0))  # (B, T, G)
    return hits & (ground_truth >= 0)


def ground_truth_mass(probs: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """Head-mean attention probability on each ground-truth position.

    Args:
        probs: (B, H, T, T) attention probabilities.
        ground_truth: (B, T, G) long positions, -1 = none.

    Returns:
        (B, T, G) float, 0 where the ground truth is -1.
    """
    p = head_mean_probs(probs)  # (B, T, T)
    mass = p.gather(-1, ground_truth.clamp(min=0))  # (B, T, G)
    return torch.where(ground_truth >= 0, mass, torch.zeros_like(mass))


def mean_over_answers(values: torch.Tensor, answers: torch.Tensor) -> float:
    """Mean of (B, T) `values` over the answer positions (B, T) bool; NaN if there are none."""
    if not bool(answers.any()):
        return math.nan
    return float(values[answers].float().mean())


def ground_truth_scalars(
    traces: Sequence,
    ground_truth: torch.Tensor,
    selections: Sequence[torch.Tensor | None] | None = None,
    baselines: dict[str, Sequence[torch.Tensor]] | None = None,
) -> dict[str, float]:
    """History scalars of one probe pass against the ground truth, per layer `L{i}/name` and the
    mean over layers under `name`.

    Names: `gt_hit_at_k` (value position in the run's selection), `gt_key_hit_at_k` (key position),
    `gt_hit_at_k_<baseline>` (value position in that baseline's selection of the same probe),
    `gt_mass` (dense attention on the value position), `gt_pair_mass` (on key + value), and
    `gt_attn_mass` (the attention actually used, on the value position).

    Args:
        traces: one `AttentionTrace` per layer with `dense_attn_probs` (trace="full").
        ground_truth: (B, T, G) long.
        selections: per layer the run's (B, T, k) selection, or None where a layer has none.
        baselines: {name: per layer (B, T, k) selection}.
    """
    answers = answer_rows(ground_truth)  # (B, T)
    per_layer: list[dict[str, float]] = []
    for layer, trace in enumerate(traces):
        gt = ground_truth.to(trace.dense_attn_probs.device)
        values: dict[str, float] = {}
        mass = ground_truth_mass(trace.dense_attn_probs, gt)  # (B, T, G)
        values["gt_mass"] = mean_over_answers(mass[..., VALUE], answers)
        values["gt_pair_mass"] = mean_over_answers(mass.sum(-1), answers)
        if trace.attn_probs is not None:
            values["gt_attn_mass"] = mean_over_answers(ground_truth_mass(trace.attn_probs, gt)[..., VALUE], answers)
        selected = selections[layer] if selections is not None else None
        if selected is not None:
            hits = ground_truth_hits(selected.to(gt.device), gt)  # (B, T, G)
            values["gt_hit_at_k"] = mean_over_answers(hits[..., VALUE], answers)
            values["gt_key_hit_at_k"] = mean_over_answers(hits[..., KEY], answers)
        for name, per_layer_selection in (baselines or {}).items():
            hits = ground_truth_hits(per_layer_selection[layer].to(gt.device), gt)
            values[f"gt_hit_at_k_{name}"] = mean_over_answers(hits[..., VALUE], answers)
        per_layer.append(values)
    scalars: dict[str, float] = {}
    for name in sorted({name for values in per_layer for name in values}):
        column = [values.get(name, math.nan) for values in per_layer]
        for layer, value in enumerate(column):
            scalars[f"L{layer}/{name}"] = float(value)
        finite = [v for v in column if math.isfinite(v)]
        scalars[name] = sum(finite) / len(finite) if finite else math.nan
    return scalars


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, ground_truth: torch.Tensor) -> float:
    """Share of the answer positions whose argmax prediction is the target; logits (B, T, V),
    targets (B, T), ground_truth (B, T, G)."""
    answers = answer_rows(ground_truth)
    return mean_over_answers((logits.argmax(-1) == targets).float(), answers)
