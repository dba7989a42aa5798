"""The three component-ablation modes: what "baseline" and "ablated" mean in each.

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
  Metrics, patterns and predictions are those of THE ADVERSARIAL MASKS.

Each mode returns a `ModeOutcome`; `components.component_ablation_study` turns it into a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_viz.analysis.ablation.decomposition import Decomposition, component_masks
from sparse_viz.analysis.ablation.metrics import kl_per_position, logit_change_metrics
from sparse_viz.analysis.ablation.sweep import eager_attention

MODES = ("deterministic", "stochastic", "adversarial")

Masks = dict[str, torch.Tensor]  # module path -> mask broadcastable to (N, T, C)


def masked_forward(model: nn.Module, input_ids: torch.Tensor, masks: Mapping[str, torch.Tensor],
                   decomposition: Decomposition, patterns: bool = False,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """Logits (N, T, V) float32 and, with `patterns`, each layer's (N, H, T, T) attention, with
    the modules in `masks` running from their masked components (the others untouched)."""
    with component_masks(model, decomposition, masks), eager_attention(model, patterns):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=patterns, use_cache=False)
    return out.logits.float(), (tuple(a.float() for a in out.attentions) if patterns else None)


@dataclass
class ComponentRun:
    """What every mode shares: the model and inputs, the ablated components, the original run.

    Attributes:
        input_ids: (N, T); attention_mask: (N, T) or None; valid: (N, T) bool, real tokens.
        ablated: module path -> component indices ablated together.
        original_logits: (N, T, V) of the unmodified model; original_patterns: its attention.
    """

    model: nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    decomposition: Decomposition
    ablated: Mapping[str, Sequence[int]]
    patterns: bool
    progress: bool
    valid: torch.Tensor = field(init=False)
    original_logits: torch.Tensor = field(init=False)
    original_patterns: tuple | None = field(init=False)

    def __post_init__(self) -> None:
        N, T = self.input_ids.shape
        self.valid = (torch.ones(N, T, dtype=torch.bool, device=self.input_ids.device)
                      if self.attention_mask is None else self.attention_mask.bool())
        with torch.no_grad():
            self.original_logits, self.original_patterns = self.forward({}, self.patterns)

    @property
    def paths(self) -> list[str]:
        return list(self.decomposition.factors)

    @property
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum()

    def ones(self) -> Masks:
        """Every component kept: mask 1, (C,) per module."""
        return {p: torch.ones(self.decomposition[p].n_components, device=self.input_ids.device) for p in self.paths}

    def ci(self, ci_default: float) -> Masks:
        """Each module's causal importances (C,), `ci_default` where the decomposition has none."""
        out = {}
        for p in self.paths:
            f = self.decomposition[p]
            ci = f.ci if f.ci is not None else torch.full((f.n_components,), float(ci_default))
            out[p] = ci.to(device=self.input_ids.device, dtype=torch.float32)  # (C,)
        return out

    def with_ablated_zeroed(self, masks: Masks) -> Masks:
        """`masks` with the ablated components' entries set to 0 (last dim = components)."""
        out = dict(masks)
        for p, idx in self.ablated.items():
            m = out[p].clone()
            m[..., list(idx)] = 0.0
            out[p] = m
        return out

    def forward(self, masks: Mapping[str, torch.Tensor], patterns: bool = False) -> tuple[torch.Tensor, tuple | None]:
        return masked_forward(self.model, self.input_ids, masks, self.decomposition, patterns, self.attention_mask)


@dataclass
class ModeOutcome:
    """One mode's comparison of its baseline with the ablated run.

    Attributes:
        kl: (N, T) KL(baseline || ablated) per position (mean over samples when stochastic).
        summary: kl_divergence, frac_top1_changed, delta_logprob_top1, kl_std_over_samples,
            reconstruction_kl.
        baseline_logits, ablated_logits: (N, T, V) what the prediction table compares (log
            sample-mean probabilities when stochastic).
        baseline_patterns, ablated_patterns: per layer (N, H, T, T), or None.
        masks: module path -> the ablated run's mask (C,) (stochastic: mean over real tokens).
        notes: sentences the report must show.
        pgd_history: KL after each PGD step (adversarial).
    """

    kl: torch.Tensor
    summary: dict[str, float]
    baseline_logits: torch.Tensor
    ablated_logits: torch.Tensor
    baseline_patterns: tuple | list | None
    ablated_patterns: tuple | list | None
    masks: Masks
    notes: list[str] = field(default_factory=list)
    pgd_history: list[float] = field(default_factory=list)


def stochastic_ablation(run: ComponentRun, n_samples: int, ci_default: float, seed: int) -> ModeOutcome:
    """Paired samples: baseline mask ci + (1 - ci) u and ablated mask (ci with the ablated set to 0)
    + (1 - ci) u share each sample's u; metrics are means over the samples."""
    from tqdm.auto import tqdm

    generator = torch.Generator(device="cpu").manual_seed(seed)
    paths, valid, device = run.paths, run.valid, run.input_ids.device
    N, T = run.input_ids.shape
    ci = run.ci(ci_default)
    ci_ablated = run.with_ablated_zeroed(ci)
    samples_kl, samples_top1, samples_delta, noise_kl = [], [], [], []
    base_probs = abl_probs = 0.0
    base_attn_sum = abl_attn_sum = None
    mask_sum = {p: torch.zeros_like(ci[p]) for p in paths}
    for _ in tqdm(range(n_samples), desc="stochastic masks", disable=not run.progress):
        u = {p: torch.rand((N, T, ci[p].numel()), generator=generator).to(device) for p in paths}  # (N, T, C)
        base_mask = {p: ci[p] + (1 - ci[p]) * u[p] for p in paths}
        abl_mask = {p: ci_ablated[p] + (1 - ci_ablated[p]) * u[p] for p in paths}
        with torch.no_grad():
            b_logits, b_attn = run.forward(base_mask, run.patterns)
            a_logits, a_attn = run.forward(abl_mask, run.patterns)
        m = logit_change_metrics(b_logits, a_logits, valid)
        samples_kl.append(torch.where(valid, m["kl"], 0.0))
        samples_top1.append(float(m["frac_top1_changed"]))
        samples_delta.append(float(m["delta_logprob_top1_mean"]))
        noise_kl.append(float(logit_change_metrics(run.original_logits, b_logits, valid)["kl_divergence"]))
        base_probs = base_probs + F.softmax(b_logits, -1) / n_samples
        abl_probs = abl_probs + F.softmax(a_logits, -1) / n_samples
        for p in paths:
            mask_sum[p] += abl_mask[p][valid].mean(0) / n_samples  # mean over real tokens
        if run.patterns:
            base_attn_sum = _running_mean(base_attn_sum, b_attn, n_samples)
            abl_attn_sum = _running_mean(abl_attn_sum, a_attn, n_samples)
    kl = torch.stack(samples_kl).mean(0)  # (N, T)
    per_sample = torch.stack([k.sum() / run.n_valid for k in samples_kl])
    summary = {"kl_divergence": float(kl.sum() / run.n_valid), "frac_top1_changed": float(np.mean(samples_top1)),
               "delta_logprob_top1": float(np.mean(samples_delta)),
               "kl_std_over_samples": float(per_sample.std()) if n_samples > 1 else 0.0,
               "reconstruction_kl": float(np.mean(noise_kl))}
    note = (f"Stochastic mode: the BASELINE IS STOCHASTIC TOO (mask = ci + (1 - ci) u, {n_samples} samples, "
            f"u shared by baseline and ablated in each sample); its mean KL from the original model is "
            f"reconstruction_kl = {summary['reconstruction_kl']:.4g}. Metrics are means over samples; "
            f"patterns and predictions use sample-mean attention / probabilities. Masks shown are mean ablated masks.")
    return ModeOutcome(kl=kl, summary=summary, baseline_logits=base_probs.clamp_min(1e-30).log(),
                       ablated_logits=abl_probs.clamp_min(1e-30).log(), baseline_patterns=base_attn_sum,
                       ablated_patterns=abl_attn_sum, masks=mask_sum, notes=[note])


def _running_mean(total: list | None, sample: tuple, n_samples: int) -> list:
    if total is None:
        return [a / n_samples for a in sample]
    return [s + a / n_samples for s, a in zip(total, sample)]


def adversarial_masks(run: ComponentRun, ci_default: float, pgd_steps: int, pgd_step_size: float
                      ) -> tuple[Masks, list[float], list[str]]:
    """Masks that maximise KL(original || ablated) within mask = ci + (1 - ci) s, s in [0, 1]^C,
    with the ablated components at 0: sign-gradient ascent from s = 1, best iterate kept.

    Returns:
        (masks (C,) per module, KL after each step, notes).
    """
    from tqdm.auto import tqdm

    paths = run.paths
    ci = run.ci(ci_default)
    sources = {p: torch.ones_like(ci[p], requires_grad=True) for p in paths}
    keep = run.with_ablated_zeroed({p: torch.ones_like(ci[p]) for p in paths})

    def masks_of(src: Masks) -> Masks:
        return {p: keep[p] * (ci[p] + (1 - ci[p]) * src[p]) for p in paths}  # (C,)

    history: list[float] = []
    best_kl, best = -1.0, {p: s.detach().clone() for p, s in sources.items()}
    for step in tqdm(range(pgd_steps + 1), desc="PGD", disable=not run.progress):
        logits, _ = run.forward(masks_of(sources))
        loss = kl_per_position(run.original_logits, logits)[run.valid].mean()  # differentiable
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
    notes = [f"Adversarial mode: baseline = the original model; the non-ablated masks were chosen by "
             f"PGD ({pgd_steps} steps, step {pgd_step_size}) within mask = ci + (1 - ci) s, s in [0, 1], "
             f"to maximise KL, starting from mask 1 and keeping the best iterate. Metrics, patterns and "
             f"predictions below are those of THE ADVERSARIAL MASKS."]
    if all(bool((ci[p] >= 1).all()) for p in paths):
        notes.append("Every ci is 1, so the constraint leaves PGD nothing to vary: adversarial = deterministic. "
                     "Give the decomposition ci values or --ci-default < 1.")
    return {p: m.detach() for p, m in masks_of(best).items()}, history, notes


def fixed_mask_ablation(run: ComponentRun, mode: str, ci_default: float = 1.0, pgd_steps: int = 20,
                        pgd_step_size: float = 0.1) -> ModeOutcome:
    """Deterministic (ablated components at 0, the rest at 1) or adversarial (the rest chosen by
    `adversarial_masks`), both against the ORIGINAL model."""
    ones = run.ones()
    with torch.no_grad():
        reconstructed, _ = run.forward(ones)
    reconstruction_kl = float(logit_change_metrics(run.original_logits, reconstructed, run.valid)["kl_divergence"])
    history: list[float] = []
    if mode == "adversarial":
        masks, history, notes = adversarial_masks(run, ci_default, pgd_steps, pgd_step_size)
    else:
        masks = run.with_ablated_zeroed(ones)
        notes = ["Deterministic mode: baseline = the ORIGINAL model; ablated = the decomposed modules "
                 "rebuilt from their components with the ablated ones removed."]
    notes.append(f"reconstruction_kl = {reconstruction_kl:.4g}: KL(original || all components kept), reported "
                 "separately from the ablation's effect.")
    with torch.no_grad():
        ablated_logits, ablated_patterns = run.forward(masks, run.patterns)
    m = logit_change_metrics(run.original_logits, ablated_logits, run.valid)
    summary = {"kl_divergence": float(m["kl_divergence"]), "frac_top1_changed": float(m["frac_top1_changed"]),
               "delta_logprob_top1": float(m["delta_logprob_top1_mean"]), "kl_std_over_samples": 0.0,
               "reconstruction_kl": reconstruction_kl}
    return ModeOutcome(kl=m["kl"], summary=summary, baseline_logits=run.original_logits, ablated_logits=ablated_logits,
                       baseline_patterns=run.original_patterns, ablated_patterns=ablated_patterns, masks=masks,
                       notes=notes, pgd_history=history)
