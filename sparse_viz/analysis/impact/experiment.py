"""Does a selection keep the keys that matter? All-pairs impact of a prompt, scored against selectors.

For every analysed layer: the all-pairs impact matrix (`masking/all_pairs.py`), the model's own
attention mass (probabilities summed over heads), and, for each k, how well each selection
agrees with the impact (`agreement.py`):

    attention_mass   top-k of the attention mass (the oracle of DSA's recipe); Spearman of the mass
    indexer          top-k of the Lightning Indexer's scores (DSA checkpoints, or a model with
                     indexers attached); Spearman of the scores
    local            the last k keys
    sink_local       the first `sink_tokens` keys and the last k - sink_tokens
    random           k random past keys (seeded)
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparse_viz.analysis.impact.agreement import impact_recall_at_k, impact_share, scored_rows, spearman_by_row
from sparse_viz.analysis.index_spec import as_indices
from sparse_viz.analysis.masking.all_pairs import all_pairs_attention_impact
from sparse_viz.analysis.masking.experiment import attention_label
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.errors import SettingWarning, UserInputError
from sparse_viz.model.selectors import local_window, random_past, sink_plus_local, topk_causal
from sparse_viz.pretrained.loading import LoadedModel, load_model
from sparse_viz.pretrained.prompts import encode_prompt, read_prompt

DEFAULT_K = (8, 16, 32, 64)
# Ask "does the indexer pick the keys that matter?" of a DSA checkpoint with --attention dense: under
# its own selection only the selected keys can have any impact, which makes the indexer's score trivial.
AGREEMENT_COLUMNS = ["layer", "selector", "k", "impact_recall_at_k", "impact_share", "spearman", "n_queries"]
DEFINITIONS = {
    "impact": "l2 distance of the attention block's output at query t (after o_proj) when key s alone "
              "is hidden from t (exact; cosine distance stored beside it)",
    "impact_recall_at_k": "share of the row's k highest-impact keys that the selection holds",
    "impact_share": "share of the row's total impact on the selected keys",
    "spearman": "rank correlation of the selector's scores (attention mass) with impact over the row's keys",
    "rows": "queries with t + 1 > k (shorter rows are dense under every selector)",
}


@dataclass
class ImpactResult:
    """What an impact analysis produced.

    Attributes:
        layers: the analysed layers.
        tokens: the prompt's token texts.
        l2, cosine: (L, T, T) float32 impact matrices (NaN for s > t).
        attention_mass: (L, T, T) float32, the model's attention probabilities summed over heads.
        agreement: one row per (layer, selector, k), columns AGREEMENT_COLUMNS.
        metadata: model, prompt, settings, definitions, timings.
    """

    layers: list[int]
    tokens: list[str]
    l2: np.ndarray
    cosine: np.ndarray
    attention_mass: np.ndarray
    agreement: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def indexer_scores(model: LoadedModel, layer: int, layer_input: Any) -> torch.Tensor | None:
    """(T, T) the layer's Lightning Indexer scores of its normed input, or None without indexers."""
    selection = model.adapter.selection
    if selection is None or selection.indexers is None:
        return None
    normed = model.adapter.input_norm(layer)(layer_input.hidden)  # (1, T, D)
    return selection.index_scores(layer, normed)[0].float().cpu()


def selections(n_tokens: int, k: int, mass: torch.Tensor, sink_tokens: int, seed: int,
               index_scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each compared selector's keys, (T, k) long; sink_local only where sink_tokens < k, indexer
    only with index scores."""
    chosen = {
        "attention_mass": topk_causal(mass[None], k)[0],
        **({"indexer": topk_causal(index_scores[None], k)[0]} if index_scores is not None else {}),
        "local": local_window(1, n_tokens, k)[0],
        "random": random_past(1, n_tokens, k, seed)[0],
    }
    if sink_tokens < k:
        chosen["sink_local"] = sink_plus_local(1, n_tokens, k, sink_tokens)[0]
    return chosen


def agreement_rows(layer: int, impact: torch.Tensor, mass: torch.Tensor, ks: Sequence[int], sink_tokens: int,
                   seed: int, index_scores: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """AGREEMENT_COLUMNS rows of one layer, for every k shorter than the sequence."""
    n_tokens = impact.shape[0]
    scores = {"attention_mass": mass, "indexer": index_scores}
    rows = []
    for k in ks:
        if k >= n_tokens:
            continue
        for name, selected in selections(n_tokens, k, mass, sink_tokens, seed, index_scores).items():
            scored = scores.get(name)
            rows.append({
                "layer": layer, "selector": name, "k": k,
                "impact_recall_at_k": float(np.mean(impact_recall_at_k(selected, impact, k))),
                "impact_share": float(np.nanmean(impact_share(selected, impact, k))),
                "spearman": float(np.nanmean(spearman_by_row(scored, impact, k))) if scored is not None else float("nan"),
                "n_queries": len(scored_rows(n_tokens, k)),
            })
    return rows


def warn_k_without_informative_query(ks: Sequence[int], n_tokens: int) -> None:
    """Warn about the k >= the prompt's `n_tokens`: query t sees t + 1 <= n_tokens keys, so every
    selection of k keeps the whole row and there is nothing to compare (`agreement_rows` skips
    such a k). A warning, not an error: the impact matrices, the analysis's main result, are
    still exact and written; only the agreement table lacks those k (or is empty)."""
    degenerate = [value for value in ks if value >= n_tokens]
    if not degenerate:
        return
    if len(degenerate) == len(ks):
        warnings.warn(f"every k ({', '.join(map(str, ks))}) is >= the prompt's {n_tokens} tokens: no query sees more "
                      "than k keys, so every selection keeps every key and no selector is compared (the agreement "
                      "table is empty; the impact matrices are still computed); give a longer prompt or a smaller k",
                      SettingWarning, stacklevel=3)
    else:
        warnings.warn(f"k = {', '.join(map(str, degenerate))} {'is' if len(degenerate) == 1 else 'are'} >= the "
                      f"prompt's {n_tokens} tokens: no query sees more than k keys, so every selection keeps every "
                      "key; the agreement table has no rows for "
                      f"{'it' if len(degenerate) == 1 else 'them'}", SettingWarning, stacklevel=3)


def run_impact_analysis(
    prompt: str | None = None,
    model_name: str | os.PathLike | None = None,
    *,
    model: LoadedModel | None = None,
    device: str = "auto",
    dtype: str = "float32",
    layers: str | Sequence[int] | None = None,
    k: Sequence[int] = DEFAULT_K,
    sink_tokens: int = 4,
    seed: int = 0,
    block_size: int = 64,
    chat: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
    attention: str = "own",
) -> ImpactResult:
    """All-pairs impact of a prompt's keys in every analysed layer, and its agreement with selectors.

    Args:
        prompt: prompt text (default: ./prompt.txt if present, else a built-in prompt).
        model_name: model directory or hub id (ignored when `model` is given).
        model: an already loaded model to reuse.
        device, dtype: where and how to load the model.
        layers: "0,3,5-9" or a list (default all).
        k: the selection sizes compared.
        sink_tokens: sinks of `sink_local`.
        seed: seed of `random`.
        block_size: queries per block of the impact computation (memory ~ block * T * H^2 doubles).
        chat: wrap the prompt with the tokenizer's chat template.
        progress: a tqdm bar over layers.
        attention: for a DSA training checkpoint, "own" (its selector) or "dense".

    Returns:
        ImpactResult.

    Warns:
        SettingWarning: a k >= the prompt's length (no query has more than k keys: no agreement
            row for it), or every k such (an empty agreement table).

    Raises:
        UserInputError: bad model, prompt, layers, k < 1, block_size < 1, sink_tokens < 0.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    ks = sorted({int(value) for value in k})
    if not ks or ks[0] < 1:
        raise UserInputError(f"every k must be >= 1, got {list(k)}")
    if block_size < 1 or sink_tokens < 0:
        raise UserInputError("block_size must be >= 1 and sink_tokens >= 0")
    prompt = read_prompt(prompt)
    if model is None:
        if model_name is None:
            raise UserInputError("no model given (model_name or model)")
        model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           attention=attention)
    adapter = model.adapter
    layer_list = as_indices(layers, adapter.n_layers, "layers") or list(range(adapter.n_layers))
    input_ids = encode_prompt(model.tokenizer, prompt, chat=chat, max_positions=adapter.max_positions,
                              min_tokens=2).to(model.device)
    warn_k_without_informative_query(ks, int(input_ids.shape[1]))
    inputs, _ = capture_layer_inputs(adapter, input_ids, layer_list)
    l2s, cosines, masses, rows = [], [], [], []
    for layer in tqdm(layer_list, desc="impact", unit="layer", disable=not progress):
        impact = all_pairs_attention_impact(adapter, layer, inputs[layer], block_size=block_size)
        mass = impact.attention_mass
        index_scores = indexer_scores(model, layer, inputs[layer])
        rows += agreement_rows(layer, impact.l2, mass, ks, sink_tokens, seed, index_scores)
        l2s.append(impact.l2.numpy())
        cosines.append(impact.cosine.numpy())
        masses.append(mass.numpy())
    ids = input_ids[0].tolist()
    tokens = [model.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    metadata = {
        "model": str(model.name_or_path), "model_type": adapter.model_type, "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."), "prompt": prompt, "chat": chat, "tokens": tokens,
        "token_ids": ids, "layers": layer_list, "k": ks, "sink_tokens": sink_tokens, "seed": seed,
        "attention": attention_label(adapter), "definitions": DEFINITIONS,
        "timings": {"total_seconds": round(time.perf_counter() - started, 3)},
    }
    return ImpactResult(layers=layer_list, tokens=tokens, l2=np.stack(l2s), cosine=np.stack(cosines),
                        attention_mass=np.stack(masses),
                        agreement=pd.DataFrame.from_records(rows, columns=AGREEMENT_COLUMNS), metadata=metadata)
