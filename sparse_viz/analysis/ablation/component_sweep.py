"""Component sweeps: every component of some modules ablated alone, batched (deterministic mode).

Each row is the deterministic ablation of `component_modes.py` for one component; the batched
engine (`sweep.run_batched_sweep`) runs many per forward, each starting at its module's layer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from sparse_viz.analysis.ablation.component_modes import masked_forward
from sparse_viz.analysis.ablation.components import prepare_component_run, with_analysis_seconds
from sparse_viz.analysis.ablation.decomposition import (
    Decomposition,
    component_masks,
    parse_component_spec,
)
from sparse_viz.analysis.ablation.metrics import logit_change_metrics, summary_columns
from sparse_viz.analysis.ablation.sweep import SweepResult, run_batched_sweep
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class ComponentAblation:
    """One component of one module, ablated alone (a row of a sweep).

    Attributes:
        path: module path; component: its index; layer: the module's decoder layer.
        name: table label, e.g. "3.o_proj:5" (never a bare number).
    """

    path: str
    component: int
    layer: int
    name: str

    @property
    def changes_own_layer_attention(self) -> bool:
        """q/k components change the attention pattern of their own layer; v/o only later ones."""
        return self.path.endswith(("q_proj", "k_proj"))


def _short_name(path: str) -> str:
    match = _LAYER.search(path)
    return f"{match.group(1)}.{path.rsplit('.', 1)[-1]}" if match else path


def sweep_ablations(model: nn.Module, decomposition: Decomposition, specs: Sequence[str]) -> list[ComponentAblation]:
    """Every listed component alone: "3.o_proj" (all of its components) or "3.o_proj:0-15".

    Raises:
        UserInputError: unknown module, component index beyond C, a module listed twice.
    """
    out: list[ComponentAblation] = []
    seen: set[str] = set()
    for spec in specs:
        path, indices = parse_component_spec(spec if ":" in spec else f"{spec}:all", model, decomposition)
        if path in seen:
            raise UserInputError(f"module {path!r} is listed twice in --sweep")
        seen.add(path)
        match = _LAYER.search(path)
        layer = int(match.group(1)) if match else 0  # unknown layer: forwards start at layer 0
        out += [ComponentAblation(path, c, layer, f"{_short_name(path)}:{c}") for c in indices]
    return out


@dataclass
class ComponentSweepResult(SweepResult):
    """What a component sweep produced (see `SweepResult`; `table` as `run_component_sweep`).

    Attributes:
        ablations: the ComponentAblations, in table order.
        notes: what the baseline is, the SVD label, the reconstruction error.
        decomposition_label, relative_error: of the decomposition used.
    """

    notes: list[str] = field(default_factory=list)
    decomposition_label: str = ""
    relative_error: dict[str, float] = field(default_factory=dict)


SWEEP_COLUMNS = ["ablation", "module", "layer", "component", "component_norm", "kl_divergence", "kl_max_position",
                 "frac_top1_changed", "delta_logprob_top1", "n_positions", "reconstruction_kl", "decomposition"]


def component_sweep_study(
    model: nn.Module,
    input_ids: torch.Tensor,
    decomposition: Decomposition,
    ablations: Sequence[ComponentAblation],
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    tokenizer=None,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> ComponentSweepResult:
    """Ablate each component alone (deterministic mode), `batch_size` components per forward.

    Each ablated run is the deterministic one of `component_modes.fixed_mask_ablation`: every decomposed
    module runs from its components with mask 1, except the one ablated component; the
    baseline is the ORIGINAL model, and the all-ones reconstruction error is reported
    separately. Batch row a*N + n carries ablation a (a per-row (B, 1, C) mask); with
    `reuse_prefix`, forwards start at the layer of their first module, from the layer inputs of
    the all-ones reconstruction (the reference path, one full forward per component, is tested
    to agree).

    Args:
        input_ids: (N, T); attention_mask: (N, T) 1 = token, 0 = right padding.
        decomposition: factors of every module in play; ablations: from `sweep_ablations`.
    Returns:
        ComponentSweepResult.
    """
    layout = ArchitectureAdapter.for_model(model)  # unsupported architecture -> one clear line
    for a in ablations:
        if a.path not in decomposition.factors or not 0 <= a.component < decomposition[a.path].n_components:
            raise UserInputError(f"component {a.name} is not in the decomposition")
    device = input_ids.device
    ones = {p: torch.ones(decomposition[p].n_components, device=device) for p in decomposition.factors}  # (C,)

    def row_hooks(rows: Sequence[ComponentAblation], seq_len: int):
        masks = dict(ones)
        for r, a in enumerate(rows):
            if masks[a.path].dim() == 1:
                masks[a.path] = torch.ones(len(rows), 1, len(ones[a.path]), device=device)  # (B, 1, C)
            masks[a.path][r, 0, a.component] = 0.0
        return component_masks(model, decomposition, masks)

    def pattern_layer(a: ComponentAblation) -> list[int]:
        return [min(a.layer + (0 if a.changes_own_layer_attention else 1), layout.n_layers - 1)]

    run = run_batched_sweep(
        model, input_ids, ablations, row_hooks=row_hooks, first_layer=lambda a: a.layer, pattern_layers=pattern_layer,
        attention_mask=attention_mask, batch_size=batch_size, patterns=patterns,
        prediction_positions=prediction_positions, tokenizer=tokenizer, progress=progress,
        reuse_prefix=reuse_prefix, prefix_hooks=lambda: component_masks(model, decomposition, ones),
        desc="component sweep")
    valid = torch.as_tensor(run.valid, device=device)
    with torch.no_grad():
        original, _ = masked_forward(model, input_ids, {}, decomposition, attention_mask=attention_mask)
        reconstructed, _ = masked_forward(model, input_ids, ones, decomposition, attention_mask=attention_mask)
    reconstruction_kl = float(logit_change_metrics(original, reconstructed, valid)["kl_divergence"])

    records = []
    for a, m in zip(ablations, run.metrics):
        f = decomposition[a.path]
        norm = float(f.V[:, a.component].norm() * f.U[a.component].norm())  # = s_c for SVD
        records.append({"ablation": a.name, "module": a.path, "layer": a.layer, "component": a.component,
                        "component_norm": norm, **summary_columns(m), "reconstruction_kl": reconstruction_kl,
                        "decomposition": decomposition.source})
    notes = [
        f"Decomposition: {decomposition.label or decomposition.source}.",
        "Sweep, deterministic mode: each row ablates ONE component (mask 0) while every decomposed module runs "
        "from its components with mask 1; baseline = the ORIGINAL model.",
        f"reconstruction_kl = {reconstruction_kl:.4g}: KL(original || all components kept), reported separately "
        "from each ablation's effect.",
        "component_norm = |V[:, c]| |U[c]| (the singular value s_c for the SVD baseline).",
    ]
    return ComponentSweepResult(
        table=pd.DataFrame.from_records(records, columns=SWEEP_COLUMNS), ablations=list(ablations), **run.result_fields(),
        notes=notes, decomposition_label=decomposition.label, relative_error=dict(decomposition.relative_error),
    )


def run_component_sweep(
    model: nn.Module,
    prompts: str | Sequence[str] | torch.Tensor,
    modules: Sequence[str],
    *,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    decomposition: str | Decomposition | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    output_dir=None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
    title: str = "Component sweep",
) -> pd.DataFrame:
    """Every component of the listed modules alone; the Python face of `components --sweep`.

    Args:
        model: HF causal LM, or a LoadedModel.
        prompts: a prompt, several prompts (batch items, right-padded), or ids (N, T).
        modules: "3.o_proj" (every component) or "3.o_proj:0-15", or MODULE_PATH[:IDX].
        attention_mask: (N, T) right padding of tensor `prompts`.
        decomposition: None = SVD of `modules`; a file path = SPD-style factors; a Decomposition.
        batch_size: components per forward.
        output_dir: if given, writes component_sweep.csv, patterns .npz, PNGs and report.html.
        overwrite: replace an earlier result of this project in `output_dir` (a new or empty
            folder needs nothing; any other folder is refused: `sparse_viz.output_dir`).
        metadata: with `output_dir`: what ran (model, prompt, arguments, timings), for metadata.json.
    Returns:
        DataFrame, one row per component: ablation, module, layer, component, component_norm,
        kl_divergence, kl_max_position, frac_top1_changed, delta_logprob_top1, n_positions,
        reconstruction_kl, decomposition.
    """
    if not modules:
        raise UserInputError("nothing to sweep: give --sweep LAYER.PROJ ...")
    started = time.perf_counter()
    model, tokenizer, input_ids, attention_mask, decomposition = prepare_component_run(
        model, prompts, tokenizer, attention_mask, decomposition, modules)
    ablations = sweep_ablations(model, decomposition, modules)
    result = component_sweep_study(model, input_ids, decomposition, ablations, attention_mask=attention_mask,
                                   batch_size=batch_size, patterns=patterns, prediction_positions=prediction_positions,
                                   tokenizer=tokenizer, progress=progress)
    if output_dir is not None:
        from sparse_viz.report.ablation import write_component_sweep_outputs

        write_component_sweep_outputs(result, output_dir, title=title, overwrite=overwrite,
                                      metadata=with_analysis_seconds(metadata, started))
    return result.table
