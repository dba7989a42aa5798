"""Component ablation: remove rank-1 components of q/k/v/o projections and measure the effect.

The projections of a `Decomposition` (decomposition.py) are replaced, through a forward hook
on each `nn.Linear`, by their masked component forward `((x @ V) * mask) @ U + b`. A q/k
edit is therefore an edit of the projection OUTPUT, which Qwen3 then normalises (q_norm,
k_norm) and rotates (RoPE): the order of the real model is kept.

A run reads: `run_component_ablation` (specs -> model, ids, decomposition) ->
`component_ablation_study` -> one of the modes in `component_modes.py` (deterministic,
stochastic, adversarial; each says what its baseline is) -> one table row and the report's
arrays. Every component alone, batched, is `component_sweep.py`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_viz.analysis.ablation.component_modes import (
    MODES,
    ComponentRun,
    fixed_mask_ablation,
    stochastic_ablation,
)
from sparse_viz.analysis.ablation.decomposition import (
    Decomposition,
    load_factors,
    parse_component_spec,
    svd_decomposition,
)
from sparse_viz.analysis.ablation.inputs import ablation_inputs
from sparse_viz.analysis.ablation.metrics import prediction_table, token_text
from sparse_viz.analysis.ablation.sweep import prediction_pairs
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter


@dataclass
class ComponentAblationResult:
    """What a component-ablation run produced.

    Attributes:
        table: one row (see `run_component_ablation`).
        ablated: module path -> ablated component indices.
        mode: deterministic | stochastic | adversarial.
        masks: module path -> the mask (C,) of the ABLATED run that the metrics, patterns and
            predictions come from (adversarial: the PGD masks; stochastic: the mean mask).
        kl_per_position: (N, T).
        baseline_patterns / ablated_patterns: {layer: (N, H, T, T)} per sequence.
        predictions: prediction table (see `metrics.prediction_table`).
        notes: sentences the report must show (what the baseline is, SVD label, ...).
        pgd_history: KL after each PGD step (adversarial).
    """

    table: pd.DataFrame
    ablated: dict[str, list[int]]
    mode: str
    masks: dict[str, np.ndarray]
    kl_per_position: np.ndarray
    input_ids: np.ndarray
    tokens: list[list[str]]
    baseline_patterns: dict[int, np.ndarray] = field(default_factory=dict)
    ablated_patterns: dict[int, np.ndarray] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pgd_history: list[float] = field(default_factory=list)
    decomposition_label: str = ""
    relative_error: dict[str, float] = field(default_factory=dict)


def check_ablation_request(decomposition: Decomposition, ablated: Mapping[str, Sequence[int]], mode: str,
                           n_samples: int, ci_default: float, pgd_steps: int) -> None:
    """Raises UserInputError for an unknown mode, ci_default outside [0, 1], n_samples < 1,
    pgd_steps < 0, or an ablated component the decomposition does not have."""
    if mode not in MODES:
        raise UserInputError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if not 0.0 <= ci_default <= 1.0:
        raise UserInputError(f"--ci-default must lie in [0, 1], got {ci_default}")
    if n_samples < 1 or pgd_steps < 0:
        raise UserInputError("--samples must be >= 1 and --pgd-steps >= 0")
    for path, indices in ablated.items():
        if path not in decomposition.factors:
            raise UserInputError(f"the decomposition has no factors for {path!r}")
        C = decomposition[path].n_components
        for c in indices:
            if not 0 <= c < C:
                raise UserInputError(f"component {c} out of range for {path!r} (C={C})")


def component_ablation_study(
    model: nn.Module,
    input_ids: torch.Tensor,
    decomposition: Decomposition,
    ablated: Mapping[str, Sequence[int]],
    *,
    attention_mask: torch.Tensor | None = None,
    mode: str = "deterministic",
    n_samples: int = 10,
    ci_default: float = 1.0,
    pgd_steps: int = 20,
    pgd_step_size: float = 0.1,
    seed: int = 0,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    tokenizer=None,
    progress: bool = True,
) -> ComponentAblationResult:
    """Ablate components and compare with the mode's baseline (`component_modes.py` says which).

    Args:
        model: HF causal LM.
        input_ids: (N, T); attention_mask: (N, T) 1 = token, 0 = right padding (None = none).
        decomposition: factors of the modules in play (all of them use their components).
        ablated: module path -> component indices to ablate (together).
        mode: "deterministic", "stochastic" or "adversarial".
        n_samples: stochastic samples; ci_default: ci of components without one (in [0, 1]).
        pgd_steps, pgd_step_size: adversarial PGD on the sources s in [0, 1].
        prediction_positions: positions for the prediction table (default: the last).
    Returns:
        ComponentAblationResult.
    """
    check_ablation_request(decomposition, ablated, mode, n_samples, ci_default, pgd_steps)
    model.eval()
    run = ComponentRun(model, input_ids, attention_mask, decomposition, ablated, patterns, progress)
    if mode == "stochastic":
        outcome = stochastic_ablation(run, n_samples, ci_default, seed)
    else:
        outcome = fixed_mask_ablation(run, mode, ci_default, pgd_steps, pgd_step_size)

    valid = run.valid
    name = " + ".join(f"{path}:{','.join(map(str, idx))}" for path, idx in ablated.items())
    row = {"ablation": name, "mode": mode, "modules": " ".join(ablated), "n_components_ablated": sum(len(i) for i in ablated.values()),
           **outcome.summary, "n_positions": int(run.n_valid), "n_samples": n_samples if mode == "stochastic" else 1,
           "pgd_steps": pgd_steps if mode == "adversarial" else 0, "decomposition": decomposition.source}
    ids_np = input_ids.cpu().numpy()
    return ComponentAblationResult(
        table=pd.DataFrame([row]),
        ablated={p: list(i) for p, i in ablated.items()}, mode=mode,
        masks={p: m.detach().float().cpu().numpy() for p, m in outcome.masks.items()},
        kl_per_position=torch.where(valid, outcome.kl.detach(), torch.nan).cpu().numpy(), input_ids=ids_np,
        tokens=[[token_text(tokenizer, int(i)) for i in ids_np[n, :length]] for n, length in enumerate(valid.sum(1).tolist())],
        baseline_patterns={L: a.detach().cpu().numpy() for L, a in enumerate(outcome.baseline_patterns)} if patterns else {},
        ablated_patterns={L: a.detach().cpu().numpy() for L, a in enumerate(outcome.ablated_patterns)} if patterns else {},
        predictions=prediction_table(outcome.baseline_logits, outcome.ablated_logits,
                                     prediction_pairs(valid, prediction_positions), tokenizer, input_ids),
        notes=[f"Decomposition: {decomposition.label or decomposition.source}.", *outcome.notes],
        pgd_history=outcome.pgd_history, decomposition_label=decomposition.label,
        relative_error=dict(decomposition.relative_error),
    )


def prepare_component_run(model, prompts, tokenizer, attention_mask, decomposition, specs: Sequence[str]):
    """Model, tokenizer, (N, T) ids and padding mask (None when unpadded), and the decomposition of a run.

    `decomposition`: None = SVD of the modules named in `specs`; a path = SPD-style factors.
    """
    model, tokenizer, input_ids, attention_mask = ablation_inputs(model, prompts, tokenizer, attention_mask)
    ArchitectureAdapter.for_model(model)  # unsupported architecture -> one clear line
    if isinstance(decomposition, (str, bytes)) or hasattr(decomposition, "__fspath__"):
        decomposition = load_factors(decomposition, model)
    if decomposition is None:
        paths = [parse_component_spec(s if ":" in s else f"{s}:all", model)[0] for s in specs]
        decomposition = svd_decomposition(model, dict.fromkeys(paths))
    return model, tokenizer, input_ids, attention_mask, decomposition


def with_analysis_seconds(metadata: dict | None, started: float) -> dict:
    """`metadata` with timings.analysis_seconds = the time since `started` (perf_counter).

    Args:
        metadata: the caller's metadata (its own timings, e.g. load_seconds, are kept), or None.
        started: `time.perf_counter()` when the analysis began (after loading the model).

    Returns:
        A new dict; `metadata` is not modified.
    """
    metadata = dict(metadata or {})
    metadata["timings"] = {**metadata.get("timings", {}), "analysis_seconds": round(time.perf_counter() - started, 4)}
    return metadata


def run_component_ablation(
    model: nn.Module,
    prompts: str | Sequence[str] | torch.Tensor,
    components: Sequence[str],
    *,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    decomposition: str | Decomposition | None = None,
    mode: str = "deterministic",
    n_samples: int = 10,
    ci_default: float = 1.0,
    pgd_steps: int = 20,
    pgd_step_size: float = 0.1,
    seed: int = 0,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    output_dir=None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
    title: str = "Component ablation",
) -> pd.DataFrame:
    """Component ablation from specs; the Python face of `python -m sparse_viz.analysis components`.

    Args:
        model: HF causal LM, or a LoadedModel.
        prompts: a prompt, several prompts (batch items, right-padded), or ids (N, T).
        components: specs ablated together, e.g. ["3.o_proj:0,1", "2.q_proj:5"].
        attention_mask: (N, T) right padding of tensor `prompts` (text prompts make their own).
        decomposition: None = SVD of the modules named in `components`; a file path = SPD-style
            factors (`load_factors`); or a Decomposition.
        mode, n_samples, ci_default, pgd_steps, pgd_step_size, seed: see `component_ablation_study`.
        output_dir: if given, writes component_ablation.csv, patterns .npz, PNGs, report.html.
        overwrite: replace an earlier result of this project in `output_dir` (a new or empty
            folder needs nothing; any other folder is refused: `sparse_viz.output_dir`).
        metadata: with `output_dir`: what ran (model, prompt, arguments, timings), for metadata.json.
    Returns:
        DataFrame with one row: ablation, mode, modules, n_components_ablated, kl_divergence,
        frac_top1_changed, delta_logprob_top1, kl_std_over_samples, reconstruction_kl,
        n_positions, n_samples, pgd_steps, decomposition.
    """
    if not components:
        raise UserInputError("nothing to ablate: give --ablate LAYER.PROJ:INDICES ...")
    started = time.perf_counter()
    model, tokenizer, input_ids, attention_mask, decomposition = prepare_component_run(
        model, prompts, tokenizer, attention_mask, decomposition, components)
    ablated: dict[str, list[int]] = {}
    for spec in components:
        path, idx = parse_component_spec(spec, model, decomposition)
        ablated[path] = sorted(set(ablated.get(path, [])) | set(idx))
    result = component_ablation_study(
        model, input_ids, decomposition, ablated, attention_mask=attention_mask, mode=mode, n_samples=n_samples, ci_default=ci_default,
        pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, seed=seed, patterns=patterns,
        prediction_positions=prediction_positions, tokenizer=tokenizer, progress=progress)
    if output_dir is not None:
        from sparse_viz.report.ablation import write_component_ablation_outputs

        write_component_ablation_outputs(result, output_dir, title=title, overwrite=overwrite,
                                         metadata=with_analysis_seconds(metadata, started))
    return result.table
