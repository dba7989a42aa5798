"""How much of a pretrained model's quality survives when each layer attends to k selected keys.

For each selector (`dense`, `topk` with trained indexers, `local`, `sink_local`, `random`,
`oracle`) and each k, on windows of held-out text:

    perplexity   exp(mean next-token NLL over every position of every window), the model
                 attending only to each layer's selected keys (`pretrained/selected_attention.py`)
    mass@k       per layer, the share of the model's own dense attention (summed over heads,
                 L1-normalised per query) that the selection keeps, mean over queries with t + 1 > k
    recall@k     per layer, the share of the dense top-k keys (by that mass) that the selection holds

mass@k and recall@k compare the selection with the DENSE model's attention on the same windows
(the selections of `topk`, `local`, `sink_local` and `random` do not depend on the attention; the
oracle's is the dense top-k by construction, so its coverage is the ceiling).

A k at or above the window length T is degenerate: query t sees t + 1 <= T <= k keys, so every
selector keeps them all and equals dense. Such a k is warned about (`SettingWarning`) and its
mass@k and recall@k are NaN (no informative query), not 1; if every k is degenerate the
evaluation is refused (`UserInputError`): it would only measure dense attention again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from sparse_viz.errors import SettingWarning, UserInputError
from sparse_viz.model.attention import selection_mask
from sparse_viz.model.selectors import topk_causal
from sparse_viz.pretrained.loading import LoadedModel
from sparse_viz.pretrained.selected_attention import KeySelection, selection_installed

DEFAULT_K = (16, 32, 64, 128)
DEFAULT_SELECTORS = ("dense", "local", "sink_local", "random", "oracle")
DEFINITIONS = {
    "perplexity": "exp(mean next-token NLL over every position of every window), each layer attending only to its "
                  "selected keys (rows with t + 1 <= k dense)",
    "mass_at_k": "share of the dense model's attention (summed over heads, per query) on the keys the selection kept, "
                 "per layer, mean over the informative queries, those with t + 1 > k (the others keep every key); "
                 "empty where there is none (k >= the window length: every selector equals dense)",
    "recall_at_k": "share of the dense top-k keys (by that attention) the selection kept, over the same queries",
    "oracle": "top-k of the layer's own attention summed over heads, computed in the sparse forward itself",
}
TABLE_COLUMNS = ["selector", "k", "perplexity", "nll", "n_tokens", "relative_to_dense"]
LAYER_COLUMNS = ["selector", "k", "layer", "mass_at_k", "recall_at_k"]


@dataclass
class SparseEvaluation:
    """Perplexity per (selector, k) and per-layer coverage of the dense attention.

    Attributes:
        table: TABLE_COLUMNS, one row per (selector, k) (dense once, k = the full context).
        layers: LAYER_COLUMNS, one row per (selector, k, layer).
        metadata: model, windows, settings.
    """

    table: pd.DataFrame
    layers: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)


def next_token_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed next-token NLL of one window: logits (1, T, V), window (T,)."""
    return float(F.cross_entropy(logits[0, :-1].float(), window[1:], reduction="sum"))


@torch.no_grad()
def dense_pass(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int, list[list[torch.Tensor]]]:
    """One dense forward per window: the summed next-token NLL, the number of predictions, and
    per window each layer's attention summed over heads and L1-normalised per query, (T, T).

    Args:
        windows: (N, T) token ids.
    """
    total, masses = 0.0, []
    for window in windows:
        out = model(input_ids=window[None], use_cache=False, output_attentions=True)
        total += next_token_nll(out.logits, window)
        masses.append([a[0].float().sum(0) / a.shape[1] for a in out.attentions])
    return total, windows.numel() - windows.shape[0], masses


def coverage(selected: torch.Tensor, mass: torch.Tensor, k: int) -> tuple[float, float]:
    """(mass@k, recall@k) of a selection (T, k') against a dense attention row mass (T, T),
    averaged over the informative queries, t + 1 > k; (NaN, NaN) when there is none (k >= T),
    as a selection that keeps every key says nothing about selecting."""
    T = mass.shape[0]
    if k >= T:
        return math.nan, math.nan
    keep = selection_mask(selected[None], T)[0]  # (T, T)
    top = selection_mask(topk_causal(mass[None], k), T)[0]  # (T, T): the dense top-k
    rows = torch.arange(k, T)
    kept_mass = (mass * keep).sum(-1)[rows]
    recall = (top & keep).sum(-1)[rows].float() / k
    return float(kept_mass.mean()), float(recall.mean())


def check_k_against_length(ks: Sequence[int], length: int) -> None:
    """Warn about each k >= `length` (the window length): query t sees t + 1 <= length keys, so
    at such a k every selector keeps every key and equals dense.

    Raises:
        UserInputError: every k is such a k. The evaluation would measure dense attention once
            per selector and k, at full cost, and report nothing about selection.
    """
    degenerate = [value for value in ks if value >= length]
    if degenerate and len(degenerate) == len(ks):
        raise UserInputError(f"every k ({', '.join(map(str, ks))}) is >= the window length of {length} tokens: "
                             f"no query sees more than {length} keys, so every selector would keep them all and "
                             f"equal dense; give a k below {length} or longer windows (--seq-len)")
    for value in degenerate:
        warnings.warn(f"k = {value} is >= the window length of {length} tokens: no query sees more than k keys, "
                      f"so at k = {value} every selector keeps every key and equals dense; its mass@k and recall@k "
                      "are left empty (no informative query)", SettingWarning, stacklevel=3)


def evaluate_selectors(
    model: LoadedModel,
    windows: torch.Tensor,
    *,
    k: Sequence[int] = DEFAULT_K,
    selectors: Sequence[str] = DEFAULT_SELECTORS,
    sink_tokens: int = 4,
    seed: int = 0,
    dense_layers: int = 0,
    indexers: torch.nn.ModuleList | None = None,
    indexer_rope_dim: int = 0,
    indexer_rope_theta: float = 10000.0,
    progress: bool = False,
) -> SparseEvaluation:
    """Perplexity and coverage of every (selector, k) on `windows` (N, T) of held-out text.

    Warns:
        SettingWarning: a k >= the window length (every selector equals dense at it).

    Raises:
        UserInputError: an unknown selector, k < 1, `topk` without indexers, every k >= the
            window length.
    """
    from tqdm.auto import tqdm

    ks = sorted({int(value) for value in k})
    if not ks or ks[0] < 1:
        raise UserInputError(f"every k must be >= 1, got {list(k)}")
    check_k_against_length(ks, int(windows.shape[1]))
    dense_total, n_tokens, masses = dense_pass(model.model, windows)  # masses: [N][L] (T, T)
    dense_nll = dense_total / n_tokens
    rows = [{"selector": "dense", "k": windows.shape[1], "perplexity": math.exp(dense_nll), "nll": dense_nll,
             "n_tokens": n_tokens, "relative_to_dense": 1.0}]
    layer_rows = []
    runs = [(name, value) for name in selectors if name != "dense" for value in ks]
    for name, value in tqdm(runs, desc="selectors", disable=not progress):
        if name == "sink_local" and value <= sink_tokens:
            continue
        selection = KeySelection(name, top_k=value, sink_tokens=sink_tokens, seed=seed, dense_layers=dense_layers,
                                 indexers=indexers, indexer_rope_dim=indexer_rope_dim,
                                 indexer_rope_theta=indexer_rope_theta)
        with selection_installed(model.model, selection):
            total, coverage_by_layer = sparse_windows(model, selection, windows, masses, value)
        nll = total / n_tokens
        rows.append({"selector": name, "k": value, "perplexity": math.exp(nll), "nll": nll,
                     "n_tokens": n_tokens, "relative_to_dense": math.exp(nll - dense_nll)})
        layer_rows += [{"selector": name, "k": value, "layer": layer, "mass_at_k": m, "recall_at_k": r}
                       for layer, (m, r) in enumerate(coverage_by_layer)]
    metadata = {"model": str(model.name_or_path), "n_windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                "k": ks, "selectors": list(selectors), "sink_tokens": sink_tokens, "seed": seed,
                "dense_layers": dense_layers, "definitions": DEFINITIONS}
    return SparseEvaluation(table=pd.DataFrame.from_records(rows, columns=TABLE_COLUMNS),
                            layers=pd.DataFrame.from_records(layer_rows, columns=LAYER_COLUMNS), metadata=metadata)


@torch.no_grad()
def sparse_windows(model: LoadedModel, selection: KeySelection, windows: torch.Tensor,
                   masses: list[list[torch.Tensor]], k: int) -> tuple[float, list[tuple[float, float]]]:
    """One selection-restricted forward per window: its summed NLL, and per layer the mass@k and
    recall@k of the selections that ran (`KeySelection.last_selected`) against the dense model's
    attention on that window, averaged over windows."""
    n_layers = model.adapter.n_layers
    total = 0.0
    per_layer = [[0.0, 0.0] for _ in range(n_layers)]
    for window, mass in zip(windows, masses):
        selection.last_selected.clear()
        total += next_token_nll(model.model(input_ids=window[None], use_cache=False).logits, window)
        for layer in range(n_layers):
            selected = selection.last_selected.get(layer)
            if k >= mass[layer].shape[0]:  # no query sees more than k keys: nothing to measure
                m, r = math.nan, math.nan
            elif selected is None:  # a dense layer (dense_layers) keeps every causal key
                m, r = 1.0, 1.0
            else:
                m, r = coverage(selected[0].cpu(), mass[layer].cpu(), k)
            per_layer[layer][0] += m / len(windows)
            per_layer[layer][1] += r / len(windows)
    return total, [(m, r) for m, r in per_layer]
