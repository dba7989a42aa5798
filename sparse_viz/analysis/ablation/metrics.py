"""How an ablation changed the next-token predictions: KL, top-1 change, prediction tables.

p = the baseline's and q = the ablated model's next-token distributions, at every position of
every sequence (never item 0 only). `kl_per_position` is the definition in its readable form;
`BaselineDistribution` is the fast path a sweep uses (the baseline once, many ablations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kl_per_position(base_logits: torch.Tensor, ablated_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at every position, p = softmax(base), q = softmax(ablated).

    Args:
        base_logits, ablated_logits: (..., V).
    Returns:
        (...) = sum_v p (log p - log q), computed from log_softmax (terms with p = 0 are 0).
    """
    logp = F.log_softmax(base_logits.float(), dim=-1)
    logq = F.log_softmax(ablated_logits.float(), dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


@dataclass
class BaselineDistribution:
    """The baseline's next-token distribution, computed once and compared with every ablation.

    A sweep compares one baseline with hundreds of ablated forwards; recomputing the baseline's
    log-softmax per ablation (as `kl_per_position` does) costs more than the memory-bound
    metrics themselves. `compare` is the fast path; `kl_per_position` is its readable reference.

    Attributes:
        logits: (N, T, V) fp32 baseline logits.
        p: (N, T, V) baseline probabilities.
        top1: (N, T, 1) baseline argmax.
    """

    logits: torch.Tensor
    p: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def of(cls, base_logits: torch.Tensor) -> BaselineDistribution:
        logits = base_logits.float()
        return cls(logits, F.softmax(logits, dim=-1), logits.argmax(-1, keepdim=True))

    def compare(self, ablated_logits: torch.Tensor, valid: torch.Tensor | None = None,
                offset: int = 0) -> dict[str, torch.Tensor]:
        """Per-position and summary metrics of one ablation against this baseline.

        KL from the logit change d = ablated - base, without the large-magnitude cancellation
        of `log p - log q` (each ~10 in size) that the direct formula suffers in fp32:
            log q - log p = d - log E_p[e^d]        (softmax normalisers cancel exactly)
            KL(p || q)    = log E_p[e^d] - E_p[d] = log1p(E_p[expm1(d - E_p[d])])
        Every term is small when the ablation is small. Positions where this is not finite
        (q = 0 where p > 0, or overflow of e^d) fall back to the reference formula.

        Args:
            ablated_logits: (N, T - offset, V): the ablated logits of positions >= offset, same
                sequences as the baseline; the positions before `offset` are the baseline's
                (an ablation that starts there), so they count with KL 0 and no change.
            valid: (N, T) bool, False on padding; None = all positions.
        Returns:
            dict with per-position (N, T) tensors `kl`, `top1_changed`, `delta_logprob_top1` and
            scalar means over valid positions `kl_divergence`, `frac_top1_changed`,
            `delta_logprob_top1_mean`, the largest per-position KL `kl_max`, and `n_positions`.
        """
        ablated = ablated_logits.float()
        base, p, top1 = self.logits[:, offset:], self.p[:, offset:], self.top1[:, offset:]  # views
        changed = ablated.argmax(-1, keepdim=True) != top1  # (N, T', 1)
        d = ablated - base  # (N, T', V)
        d_top1 = d.gather(-1, top1).squeeze(-1)  # (N, T')
        mean_d = torch.einsum("ntv,ntv->nt", p, d)  # (N, T')  E_p[d]
        d.sub_(mean_d[..., None]).expm1_()  # (N, T', V)  expm1(d - E_p[d]), in place
        kl = torch.log1p(torch.einsum("ntv,ntv->nt", p, d)).clamp_min(0)  # (N, T')  >= 0 by Jensen
        log_normaliser_ratio = mean_d + kl  # (N, T)  log E_p[e^d] = lse(ablated) - lse(base)
        delta = d_top1 - log_normaliser_ratio  # (N, T)  log q(t*) - log p(t*)
        bad = ~(torch.isfinite(kl) & torch.isfinite(delta))
        if bool(bad.any()):
            logp = F.log_softmax(base[bad], dim=-1)  # (n_bad, V)
            logq = F.log_softmax(ablated[bad], dim=-1)
            kl[bad] = kl_per_position(base[bad], ablated[bad])
            delta[bad] = (logq.gather(-1, top1[bad]) - logp.gather(-1, top1[bad])).squeeze(-1)
        changed = changed.squeeze(-1)
        if offset:  # (N, T) again: the untouched positions before the offset
            kl, delta = (F.pad(t, (offset, 0)) for t in (kl, delta))
            changed = F.pad(changed, (offset, 0), value=False)
        if valid is None:
            valid = torch.ones_like(kl, dtype=torch.bool)
        n = valid.sum()
        zero = torch.zeros_like(kl)
        return {
            "kl": kl, "top1_changed": changed, "delta_logprob_top1": delta,
            "kl_divergence": torch.where(valid, kl, zero).sum() / n,  # where, not *: padding may hold NaN
            "kl_max": torch.where(valid, kl, zero).max(),
            "frac_top1_changed": (changed & valid).sum() / n,
            "delta_logprob_top1_mean": torch.where(valid, delta, zero).sum() / n,
            "n_positions": n,
        }


def logit_change_metrics(base_logits: torch.Tensor, ablated_logits: torch.Tensor,
                         valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Metrics of one ablation (see `BaselineDistribution.compare`; build that once for many).

    Args:
        base_logits, ablated_logits: (N, T, V) for the same N sequences.
        valid: (N, T) bool, False on padding; None = all positions.
    """
    return BaselineDistribution.of(base_logits).compare(ablated_logits, valid)


def prediction_table(base_logits: torch.Tensor, ablated_logits: torch.Tensor, positions: Sequence[tuple[int, int]],
                     tokenizer=None, input_ids: torch.Tensor | None = None, k: int = 5, offset: int = 0) -> list[dict]:
    """Top-k next tokens before / after the ablation at chosen (sequence, position) pairs.

    Args:
        base_logits: (N, T, V); ablated_logits: (N, T - offset, V), positions >= offset (before
            it the ablated model is the baseline, see `BaselineDistribution.compare`).
        positions: (sequence index, position) pairs.
    Returns:
        one dict per pair: seq, position, token (the input token there), before/after lists of
        {"token", "id", "prob"}, and the ablated prob of the baseline's top-1.
    """
    rows = []
    for n, t in positions:
        p = F.softmax(base_logits[n, t].float(), -1)  # (V,)
        q = p if t < offset else F.softmax(ablated_logits[n, t - offset].float(), -1)
        before, after = p.topk(k), q.topk(k)
        top1 = int(before.indices[0])
        rows.append({
            "seq": int(n), "position": int(t),
            "token": token_text(tokenizer, int(input_ids[n, t])) if input_ids is not None else "",
            "before": [{"token": token_text(tokenizer, int(i)), "id": int(i), "prob": float(v)} for v, i in zip(*before)],
            "after": [{"token": token_text(tokenizer, int(i)), "id": int(i), "prob": float(v)} for v, i in zip(*after)],
            "top1_prob_after": float(q[top1]),
        })
    return rows


def token_text(tokenizer, token_id: int) -> str:
    """Readable text of one token id (the id itself when there is no tokenizer)."""
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id])


def summary_columns(m: dict[str, float]) -> dict:
    """The table columns of one ablation's summary metrics (`BaselineDistribution.compare`)."""
    return {
        "kl_divergence": float(m["kl_divergence"]),
        "kl_max_position": float(m["kl_max"]),
        "frac_top1_changed": float(m["frac_top1_changed"]),
        "delta_logprob_top1": float(m["delta_logprob_top1_mean"]),
        "n_positions": int(m["n_positions"]),
    }
