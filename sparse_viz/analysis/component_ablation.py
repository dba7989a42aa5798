"""Component ablation: remove rank-1 components of q/k/v/o projections and measure the effect.

The projections of a `Decomposition` (decomposition.py) are replaced, through a forward hook
on each `nn.Linear`, by their masked component forward `((x @ V) * mask) @ U + b`. A q/k
edit is therefore an edit of the projection OUTPUT, which Qwen3 then normalises (q_norm,
k_norm) and rotates (RoPE): the order of the real model is kept.

Modes (each fixes what "baseline" and "ablated" mean; seed 004's pitfalls avoided):

- deterministic: baseline = the ORIGINAL model. Ablated = every decomposed module replaced by
  its components with mask 1, except the ablated components (mask 0). How far the unablated
  reconstruction already is from the original is reported separately (`reconstruction_kl`:
  KL(original || all-ones reconstruction); 0 up to rounding for SVD).
- stochastic: mask = ci + (1 - ci) * u, u ~ U[0, 1) per position and component (ci from the
  decomposition, or `ci_default`). Baseline = the same with the original ci; ablated = the
  ablated components' ci set to 0; both share u in each sample (paired). Metrics are means
  over `n_samples`; the BASELINE IS STOCHASTIC TOO, and its own distance from the original
  model is reported (`reconstruction_kl`: mean KL(original || stochastic baseline)).
- adversarial: baseline = the original model; ablated components have mask 0; the other
  components' masks are chosen within the ci constraint, mask = ci + (1 - ci) * s with
  s in [0, 1]^C per module, by projected (sign) gradient ascent on the KL. PGD starts at s = 1
  (= deterministic) and keeps the best iterate, so its KL is never below deterministic.
  Metrics, patterns and predictions are those of THE ADVERSARIAL MASKS (returned in `masks`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sparse_viz.analysis.ablation_metrics import kl_per_position, logit_change_metrics, prediction_table, summary_columns, token_text
from sparse_viz.analysis.ablation_sweep import SweepResult, eager_attention, prediction_pairs, run_batched_sweep
from sparse_viz.analysis.decomposition import Decomposition, linear_at, projection_path
from sparse_viz.analysis.head_ablation import AttentionLayout
from sparse_viz.errors import UserInputError

MODES = ("deterministic", "stochastic", "adversarial")


@contextlib.contextmanager
def component_masks(model: nn.Module, decomposition: Decomposition, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Replace each listed module's output by its masked component forward while open.

    Args:
        decomposition: factors per module path.
        masks: module path -> mask broadcastable to (B, T, C): (C,), (B, 1, C) or (B, T, C).
    """
    handles = []

    def replace(path: str, mask: torch.Tensor):
        factors = decomposition[path]

        def hook(module, args, out):
            x = args[0]  # (B, T, d_in); a sweep's batch may hold only the first B rows (ablation_sweep)
            y = factors.apply(x, mask[: x.shape[0]] if mask.dim() == 3 else mask)  # (B, T, d_out)
            return y if module.bias is None else y + module.bias
        return hook

    try:
        for path, mask in masks.items():
            handles.append(linear_at(model, path).register_forward_hook(replace(path, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Specs.
# --------------------------------------------------------------------------------------------

_SHORT = re.compile(r"^(\d+)\.([qkvo]_proj)$")


def parse_component_spec(spec: str, model: nn.Module, decomposition: Decomposition | None = None,
                         n_components: Mapping[str, int] | None = None) -> tuple[str, list[int]]:
    """Parse "LAYER.PROJ:IDX" (e.g. "3.o_proj:0,2,5-7", "0.q_proj:all") or "MODULE_PATH:IDX".

    Args:
        n_components: C per module path (to check indices); taken from `decomposition` if given,
            else min(d_in, d_out) (the SVD rank).
    Returns:
        (module path, sorted component indices).
    Raises:
        UserInputError: malformed spec, unknown module, component index >= C.
    """
    from sparse_viz.analysis.cli import parse_index_spec

    if ":" not in spec:
        raise UserInputError(f"malformed component spec {spec!r}: expected LAYER.PROJ:INDICES, e.g. 3.o_proj:0,2,5-7")
    module, _, indices = spec.rpartition(":")
    short = _SHORT.match(module.strip())
    path = projection_path(model, int(short.group(1)), short.group(2)) if short else module.strip()
    linear = linear_at(model, path)
    if decomposition is not None:
        if path not in decomposition.factors:
            raise UserInputError(f"component spec {spec!r}: the decomposition has no factors for {path!r}")
        C = decomposition[path].n_components
    elif n_components is not None and path in n_components:
        C = n_components[path]
    else:
        C = min(linear.weight.shape)
    chosen = parse_index_spec(indices, C, what=f"components of {path} (C={C})")
    return path, list(range(C)) if chosen is None else chosen


# --------------------------------------------------------------------------------------------
# The study.
# --------------------------------------------------------------------------------------------


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
        predictions: prediction table (see `head_ablation.prediction_table`).
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


def _forward(model, input_ids, masks, decomposition, patterns=False, attention_mask=None):
    with component_masks(model, decomposition, masks), eager_attention(model, patterns):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=patterns, use_cache=False)
    return out.logits.float(), (tuple(a.float() for a in out.attentions) if patterns else None)


def _ci(decomposition: Decomposition, path: str, ci_default: float, device) -> torch.Tensor:
    f = decomposition[path]
    ci = f.ci if f.ci is not None else torch.full((f.n_components,), float(ci_default))
    return ci.to(device=device, dtype=torch.float32)  # (C,)


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
    """Ablate components and compare with the mode's baseline.

    Args:
        model: HF causal LM.
        input_ids: (N, T); attention_mask: (N, T) 1 = token, 0 = right padding (None = none).
        decomposition: factors of the modules in play (all of them use their components).
        ablated: module path -> component indices to ablate (together).
        mode: "deterministic", "stochastic" or "adversarial" (see the module docstring).
        n_samples: stochastic samples; ci_default: ci of components without one (in [0, 1]).
        pgd_steps, pgd_step_size: adversarial PGD on the sources s in [0, 1].
        prediction_positions: positions for the prediction table (default: the last).
    Returns:
        ComponentAblationResult.
    """
    from tqdm.auto import tqdm

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
    model.eval()
    device = input_ids.device
    N, T = input_ids.shape
    paths = list(decomposition.factors)
    ones = {p: torch.ones(decomposition[p].n_components, device=device) for p in paths}  # (C,)
    valid = torch.ones(N, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    n_valid = valid.sum()

    def forward(masks, patterns=False):
        return _forward(model, input_ids, masks, decomposition, patterns, attention_mask)

    def mean_kl(base_logits, logits) -> torch.Tensor:  # over valid positions; differentiable
        return kl_per_position(base_logits, logits)[valid].mean()

    def ablate(mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(mask)
        for p, idx in ablated.items():
            m = out[p].clone()
            m[..., list(idx)] = 0.0
            out[p] = m
        return out

    with torch.no_grad():
        original, original_attn = forward({}, patterns)  # (N, T, V)
    notes = [f"Decomposition: {decomposition.label or decomposition.source}."]
    history: list[float] = []
    samples_kl, samples_top1, samples_delta = [], [], []

    if mode == "stochastic":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        ci = {p: _ci(decomposition, p, ci_default, device) for p in paths}
        ci_ablated = ablate(ci)
        base_probs = abl_probs = 0.0
        base_attn_sum = abl_attn_sum = None
        noise_kl = []
        mask_sum = {p: torch.zeros_like(ci[p]) for p in paths}
        for _ in tqdm(range(n_samples), desc="stochastic masks", disable=not progress):
            u = {p: torch.rand((N, T, ci[p].numel()), generator=generator).to(device) for p in paths}  # (N, T, C)
            base_mask = {p: ci[p] + (1 - ci[p]) * u[p] for p in paths}
            abl_mask = {p: ci_ablated[p] + (1 - ci_ablated[p]) * u[p] for p in paths}
            with torch.no_grad():
                b_logits, b_attn = forward(base_mask, patterns)
                a_logits, a_attn = forward(abl_mask, patterns)
            m = logit_change_metrics(b_logits, a_logits, valid)
            samples_kl.append(torch.where(valid, m["kl"], 0.0))
            samples_top1.append(float(m["frac_top1_changed"]))
            samples_delta.append(float(m["delta_logprob_top1_mean"]))
            noise_kl.append(float(logit_change_metrics(original, b_logits, valid)["kl_divergence"]))
            base_probs = base_probs + F.softmax(b_logits, -1) / n_samples
            abl_probs = abl_probs + F.softmax(a_logits, -1) / n_samples
            for p in paths:
                mask_sum[p] += abl_mask[p][valid].mean(0) / n_samples  # mean over real tokens
            if patterns:
                base_attn_sum = [a / n_samples for a in b_attn] if base_attn_sum is None else [s + a / n_samples for s, a in zip(base_attn_sum, b_attn)]
                abl_attn_sum = [a / n_samples for a in a_attn] if abl_attn_sum is None else [s + a / n_samples for s, a in zip(abl_attn_sum, a_attn)]
        kl = torch.stack(samples_kl).mean(0)  # (N, T)
        summary = {"kl_divergence": float(kl.sum() / n_valid), "frac_top1_changed": float(np.mean(samples_top1)),
                   "delta_logprob_top1": float(np.mean(samples_delta)), "kl_std_over_samples": float(torch.stack([k.sum() / n_valid for k in samples_kl]).std()) if n_samples > 1 else 0.0,
                   "reconstruction_kl": float(np.mean(noise_kl))}
        base_for_table, abl_for_table = base_probs.clamp_min(1e-30).log(), abl_probs.clamp_min(1e-30).log()
        base_attn, abl_attn = base_attn_sum, abl_attn_sum
        final_masks = mask_sum
        notes.append(f"Stochastic mode: the BASELINE IS STOCHASTIC TOO (mask = ci + (1 - ci) u, {n_samples} samples, "
                     f"u shared by baseline and ablated in each sample); its mean KL from the original model is "
                     f"reconstruction_kl = {summary['reconstruction_kl']:.4g}. Metrics are means over samples; "
                     f"patterns and predictions use sample-mean attention / probabilities. Masks shown are mean ablated masks.")
    else:
        with torch.no_grad():
            recon_logits, _ = forward(ones)
        reconstruction_kl = float(logit_change_metrics(original, recon_logits, valid)["kl_divergence"])
        masks = ablate(ones)
        if mode == "adversarial":
            ci = {p: _ci(decomposition, p, ci_default, device) for p in paths}
            sources = {p: torch.ones_like(ci[p], requires_grad=True) for p in paths}
            keep = {p: torch.ones_like(ci[p]) for p in paths}
            for p, idx in ablated.items():
                keep[p][list(idx)] = 0.0

            def adversarial_masks(src):
                return {p: keep[p] * (ci[p] + (1 - ci[p]) * src[p]) for p in paths}  # (C,)

            best_kl, best = -1.0, {p: s.detach().clone() for p, s in sources.items()}
            for step in tqdm(range(pgd_steps + 1), desc="PGD", disable=not progress):
                logits, _ = forward(adversarial_masks(sources))
                loss = mean_kl(original, logits)
                value = float(loss.detach())
                history.append(value)
                if value > best_kl:
                    best_kl, best = value, {p: s.detach().clone() for p, s in sources.items()}
                if step == pgd_steps:
                    break
                grads = torch.autograd.grad(loss, [sources[p] for p in paths])
                with torch.no_grad():
                    for p, g in zip(paths, grads):
                        sources[p].add_(pgd_step_size * g.sign()).clamp_(0.0, 1.0)
            masks = {p: m.detach() for p, m in adversarial_masks(best).items()}
            notes.append(f"Adversarial mode: baseline = the original model; the non-ablated masks were chosen by "
                         f"PGD ({pgd_steps} steps, step {pgd_step_size}) within mask = ci + (1 - ci) s, s in [0, 1], "
                         f"to maximise KL, starting from mask 1 and keeping the best iterate. Metrics, patterns and "
                         f"predictions below are those of THE ADVERSARIAL MASKS.")
            if all(bool((ci[p] >= 1).all()) for p in paths):
                notes.append("Every ci is 1, so the constraint leaves PGD nothing to vary: adversarial = deterministic. "
                             "Give the decomposition ci values or --ci-default < 1.")
        else:
            notes.append("Deterministic mode: baseline = the ORIGINAL model; ablated = the decomposed modules "
                         "rebuilt from their components with the ablated ones removed.")
        notes.append(f"reconstruction_kl = {reconstruction_kl:.4g}: KL(original || all components kept), reported "
                     "separately from the ablation's effect.")
        with torch.no_grad():
            abl_logits, abl_attn = forward(masks, patterns)
        m = logit_change_metrics(original, abl_logits, valid)
        kl = m["kl"]
        summary = {"kl_divergence": float(m["kl_divergence"]), "frac_top1_changed": float(m["frac_top1_changed"]),
                   "delta_logprob_top1": float(m["delta_logprob_top1_mean"]), "kl_std_over_samples": 0.0,
                   "reconstruction_kl": reconstruction_kl}
        base_for_table, abl_for_table, base_attn = original, abl_logits, original_attn
        final_masks = masks

    pred_pos = prediction_pairs(valid, prediction_positions)
    name = " + ".join(f"{path}:{','.join(map(str, idx))}" for path, idx in ablated.items())
    row = {"ablation": name, "mode": mode, "modules": " ".join(ablated), "n_components_ablated": sum(len(i) for i in ablated.values()),
           **summary, "n_positions": int(n_valid), "n_samples": n_samples if mode == "stochastic" else 1,
           "pgd_steps": pgd_steps if mode == "adversarial" else 0, "decomposition": decomposition.source}
    ids_np = input_ids.cpu().numpy()
    return ComponentAblationResult(
        table=pd.DataFrame([row]),
        ablated={p: list(i) for p, i in ablated.items()}, mode=mode,
        masks={p: m.detach().float().cpu().numpy() for p, m in final_masks.items()},
        kl_per_position=torch.where(valid, kl.detach(), torch.nan).cpu().numpy(), input_ids=ids_np,
        tokens=[[token_text(tokenizer, int(i)) for i in ids_np[n, :length]] for n, length in enumerate(valid.sum(1).tolist())],
        baseline_patterns={L: a.detach().cpu().numpy() for L, a in enumerate(base_attn)} if patterns else {},
        ablated_patterns={L: a.detach().cpu().numpy() for L, a in enumerate(abl_attn)} if patterns else {},
        predictions=prediction_table(base_for_table, abl_for_table, pred_pos, tokenizer, input_ids),
        notes=notes, pgd_history=history, decomposition_label=decomposition.label,
        relative_error=dict(decomposition.relative_error),
    )


def _prepare(model, prompts, tokenizer, attention_mask, decomposition, specs: Sequence[str]):
    """Model, tokenizer, (N, T) ids and padding mask, and the decomposition of a run.

    `decomposition`: None = SVD of the modules named in `specs`; a path = SPD-style factors.
    """
    from sparse_viz.analysis.decomposition import load_factors, svd_decomposition
    from sparse_viz.analysis.head_ablation import encode_prompts

    if hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        input_ids = prompts.to(device)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        attention_mask = None if attention_mask is None else attention_mask.to(device)
    else:
        if tokenizer is None:
            raise UserInputError("text prompts need a tokenizer")
        input_ids, attention_mask = encode_prompts(tokenizer, [prompts] if isinstance(prompts, str) else list(prompts), device)
    AttentionLayout.of(model)  # unsupported architecture -> one clear line
    if isinstance(decomposition, (str, bytes)) or hasattr(decomposition, "__fspath__"):
        decomposition = load_factors(decomposition, model)
    if decomposition is None:
        paths = [parse_component_spec(s if ":" in s else f"{s}:all", model)[0] for s in specs]
        decomposition = svd_decomposition(model, dict.fromkeys(paths))
    return model, tokenizer, input_ids, attention_mask, decomposition


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
    progress: bool = True,
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
    Returns:
        DataFrame with one row: ablation, mode, modules, n_components_ablated, kl_divergence,
        frac_top1_changed, delta_logprob_top1, kl_std_over_samples, reconstruction_kl,
        n_positions, n_samples, pgd_steps, decomposition.
    """
    if not components:
        raise UserInputError("nothing to ablate: give --ablate LAYER.PROJ:INDICES ...")
    model, tokenizer, input_ids, attention_mask, decomposition = _prepare(
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

        write_component_ablation_outputs(result, output_dir, title=title)
    return result.table


# --------------------------------------------------------------------------------------------
# Sweeps: every component alone, batched (deterministic mode).
# --------------------------------------------------------------------------------------------

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

    Each ablated run is the deterministic one of `component_ablation_study`: every decomposed
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
    layout = AttentionLayout.of(model)
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
        original, _ = _forward(model, input_ids, {}, decomposition, attention_mask=attention_mask)
        reconstructed, _ = _forward(model, input_ids, ones, decomposition, attention_mask=attention_mask)
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
    progress: bool = True,
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
    Returns:
        DataFrame, one row per component: ablation, module, layer, component, component_norm,
        kl_divergence, kl_max_position, frac_top1_changed, delta_logprob_top1, n_positions,
        reconstruction_kl, decomposition.
    """
    if not modules:
        raise UserInputError("nothing to sweep: give --sweep LAYER.PROJ ...")
    model, tokenizer, input_ids, attention_mask, decomposition = _prepare(
        model, prompts, tokenizer, attention_mask, decomposition, modules)
    ablations = sweep_ablations(model, decomposition, modules)
    result = component_sweep_study(model, input_ids, decomposition, ablations, attention_mask=attention_mask,
                                   batch_size=batch_size, patterns=patterns, prediction_positions=prediction_positions,
                                   tokenizer=tokenizer, progress=progress)
    if output_dir is not None:
        from sparse_viz.report.ablation import write_component_sweep_outputs

        write_component_sweep_outputs(result, output_dir, title=title)
    return result.table
