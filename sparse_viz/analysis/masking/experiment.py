"""The token masking experiment: generation steps, one row per (step, layer, masked key, variant).

Step 0 analyses the prompt, step g the prompt plus g greedy tokens. Each step's distances come
from `final_position.py` (the exact fast path) or `reference.py` (brute force); the rows have
the columns of `report.masking.RESULT_COLUMNS`, and `df.attrs["metadata"]` says what ran.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparse_viz.analysis.index_spec import as_indices
from sparse_viz.analysis.masking.final_position import (
    masked_final_position_updates,
    update_distances,
    variant_names,
)
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.reference import reference_final_position_updates
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.loading import LoadedModel, load_model
from sparse_viz.pretrained.prompts import encode_prompt, read_prompt

METHODS = ("fast", "reference")
VARIANT_DEFINITIONS = {
    "Full": "layer output - layer input at the final position (attention + MLP update of the "
    "residual stream)",
    "Attn": "attention output after o_proj at the final position (o_proj bias included)",
    "Head_N": "query head N's contribution to the residual stream at the final position: its "
    "o_proj column block W_o[:, N*hd:(N+1)*hd] applied to its attention output z_N (no bias); "
    "the heads sum to Attn minus the o_proj bias",
}
DISTANCE_DEFINITIONS = {
    "l2_distance": "||d_baseline - d_masked||_2",
    "cosine_distance": "1 - cos(d_baseline, d_masked), computed as ||d_b/|d_b| - d_m/|d_m|||^2 / 2 "
    "in float64 (exactly 0 for identical vectors)",
}


@dataclass
class SequenceMasking:
    """Distances for one sequence: l2/cosine (n_layers_selected, P, 2+H), plus the next token."""

    layers: list[int]
    positions: list[int]
    l2: np.ndarray
    cosine: np.ndarray
    next_token: int


def analyse_sequence(
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    method: str = "fast",
    progress: Any = None,
    model_inputs: dict[str, Any] | None = None,
) -> SequenceMasking:
    """Masking distances of one sequence at every selected layer and key position.

    Args:
        adapter: the model's adapter.
        input_ids: (1, T) token ids on the model's device.
        layers: layer indices (default all).
        positions: key positions to mask (default all 0..T-1).
        method: "fast" (batched exact path) or "reference" (one layer call per masked key).
        progress: optional tqdm bar, advanced once per layer.
        model_inputs: extra keyword arguments for the baseline forward (see capture_layer_inputs).

    Returns:
        SequenceMasking.
    """
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)
    positions = list(range(input_ids.shape[1])) if positions is None else list(positions)
    inputs, logits = capture_layer_inputs(adapter, input_ids, layers, model_inputs)
    compute = reference_final_position_updates if method == "reference" else masked_final_position_updates
    l2s, cosines = [], []
    for layer in layers:
        l2, cosine = update_distances(compute(adapter, layer, inputs[layer], positions))
        l2s.append(l2)
        cosines.append(cosine)
        if progress is not None:
            progress.update(1)
    return SequenceMasking(
        layers=layers,
        positions=positions,
        l2=np.stack(l2s),
        cosine=np.stack(cosines),
        next_token=int(logits.argmax()),
    )


def _token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def run_masking_experiment(
    prompt: str | None = None,
    model_name: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "float32",
    num_tokens: int = 1,
    layers: str | Sequence[int] | None = None,
    positions: str | Sequence[int] | None = None,
    exclude_first_token: bool = False,
    chat: bool = False,
    method: str = "fast",
    trust_remote_code: bool = False,
    progress: bool = False,
    model: LoadedModel | None = None,
    attention: str = "own",
) -> pd.DataFrame:
    """Token masking impact per generation step, layer, masked position and variant.

    Args:
        prompt: prompt text (default: ./prompt.txt if present, else a built-in prompt).
        model_name: model directory or hub id (ignored when `model` is given).
        device, dtype: where and how to load the model ("auto"/"cpu"/"cuda";
            "float32"/"bfloat16"/"float16").
        num_tokens: generation steps G >= 1: step 0 analyses the prompt, step g the prompt plus
            g greedy tokens; stops early after EOS.
        layers: "0,3,5-9" or a list of layer indices (default all).
        positions: key positions to mask, "0-4,7" or a list, within the prompt (default all
            positions of each step's sequence, generated tokens included).
        exclude_first_token: never mask position 0 (often an attention sink).
        chat: wrap the prompt with the tokenizer's chat template.
        method: "fast" or "reference" (brute force, one layer call per masked key).
        trust_remote_code: passed to transformers.
        progress: show a tqdm bar over layers x steps.
        model: an already loaded model to reuse.
        attention: for a DSA training checkpoint, "own" (its selector) or "dense".

    Returns:
        DataFrame with the columns of RESULT_COLUMNS; `df.attrs["metadata"]` holds the run's
        metadata (model, prompt, tokens, generated text, definitions, timings).

    Raises:
        UserInputError: bad model, prompt, num_tokens, layers, positions, method, dtype, device.
    """
    started = time.perf_counter()
    if num_tokens < 1:
        raise UserInputError(f"num_tokens must be >= 1, got {num_tokens}")
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    prompt = read_prompt(prompt)
    if model is None:
        if model_name is None:
            raise UserInputError("no model given (model_name or model)")
        model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           attention=attention)
    load_seconds = time.perf_counter() - started
    adapter, tokenizer = model.adapter, model.tokenizer

    layer_list = as_indices(layers, adapter.n_layers, "layers") or list(range(adapter.n_layers))
    input_ids = encode_prompt(
        tokenizer, prompt, chat=chat, max_positions=adapter.max_positions, min_tokens=2, reserve=num_tokens - 1
    ).to(model.device)
    n_prompt = input_ids.shape[1]
    position_list = as_indices(positions, n_prompt, "positions")

    def analyse_step(step: int, input_ids: torch.Tensor, bar: Any) -> tuple[SequenceMasking, pd.DataFrame, dict]:
        step_positions = list(range(input_ids.shape[1])) if position_list is None else list(position_list)
        if exclude_first_token:
            step_positions = [p for p in step_positions if p != 0]
        if not step_positions:
            raise UserInputError("no key positions left to mask")
        result = analyse_sequence(adapter, input_ids, layer_list, step_positions, method, progress=bar)
        record = step_record(tokenizer, step, input_ids[0].tolist(), result.next_token)
        return result, masking_rows(step, result, record["tokens"], adapter.n_heads), record

    def extend(input_ids: torch.Tensor, token: int) -> torch.Tensor:
        next_id = torch.tensor([[token]], device=input_ids.device)
        return torch.cat([input_ids, next_id], dim=1)  # (1, T+1)

    run = greedy_masking_steps(model, input_ids, num_tokens, len(layer_list), progress, analyse_step, extend)
    results = pd.concat(run.frames, ignore_index=True)
    results.attrs["metadata"] = masking_metadata(
        model,
        run,
        method=method,
        prompt=prompt,
        chat=chat,
        layers=layer_list,
        exclude_first_token=exclude_first_token,
        started=started,
        load_seconds=load_seconds,
    )
    return results


@dataclass
class GreedySteps:
    """What `greedy_masking_steps` gathered, one entry per analysed step.

    Attributes:
        frames: each step's long-format rows.
        steps: each step's `step_record`.
        generated: each step's greedy next token id.
        step_seconds: each step's wall time.
        stopped_at_eos: the last generated token is an end-of-sequence token.
    """

    frames: list[pd.DataFrame]
    steps: list[dict[str, Any]]
    generated: list[int]
    step_seconds: list[float]
    stopped_at_eos: bool = False


def greedy_masking_steps(
    model: LoadedModel,
    sequence: Any,
    num_tokens: int,
    n_layers: int,
    progress: bool,
    analyse_step: Callable[[int, Any, Any], tuple[SequenceMasking, pd.DataFrame, dict[str, Any]]],
    extend: Callable[[Any, int], Any],
) -> GreedySteps:
    """Analyse `sequence`, append its greedy next token, analyse again: at most `num_tokens`
    steps, stopping after an end-of-sequence token.

    Args:
        model: the loaded model (for its end-of-sequence ids).
        sequence: step 0's sequence: token ids (1, T), or a vision prompt's `VisionInputs`.
        num_tokens: the most steps.
        n_layers: layers analysed per step (the progress bar advances once per layer).
        progress: show a tqdm bar over layers x steps.
        analyse_step: (step, sequence, bar) -> (its SequenceMasking, its rows, its step_record).
        extend: (sequence, token id) -> the sequence with the token appended.

    Returns:
        GreedySteps.
    """
    from tqdm.auto import tqdm

    eos_ids = _eos_ids(model)
    run = GreedySteps(frames=[], steps=[], generated=[], step_seconds=[])
    bar = tqdm(total=num_tokens * n_layers, desc="masking", unit="layer", disable=not progress, file=sys.stderr)
    try:
        for step in range(num_tokens):
            step_started = time.perf_counter()
            bar.set_postfix(step=step)
            result, frame, record = analyse_step(step, sequence, bar)
            run.frames.append(frame)
            run.steps.append(record)
            run.generated.append(result.next_token)
            run.step_seconds.append(time.perf_counter() - step_started)
            if result.next_token in eos_ids:
                break
            sequence = extend(sequence, result.next_token)
    finally:
        bar.close()
    run.stopped_at_eos = bool(run.generated and run.generated[-1] in eos_ids)
    return run


def step_record(tokenizer: Any, step: int, ids: list[int], next_token: int, **extra: Any) -> dict[str, Any]:
    """One generation step's entry of metadata["steps"]: the analysed sequence and the token
    generated from it. `extra` keys (vision runs: token_kinds) go after token_ids."""
    return {
        "generation_step": step,
        "num_tokens": len(ids),
        "tokens": _token_texts(tokenizer, ids),
        "token_ids": ids,
        **extra,
        "next_token": _token_texts(tokenizer, [next_token])[0],
        "next_token_id": next_token,
    }


def masking_metadata(
    model: LoadedModel,
    run: GreedySteps,
    *,
    method: str,
    prompt: str,
    chat: bool,
    layers: list[int],
    exclude_first_token: bool,
    started: float,
    load_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's metadata (`df.attrs["metadata"]`, written as metadata.json).

    Args:
        model: the loaded model.
        run: the analysed steps (at least one).
        method, prompt, chat, layers, exclude_first_token: the run's settings.
        started: `time.perf_counter()` at the start of the run (total_seconds counts from it).
        load_seconds: time to load the model.
        extra: further keys (vision runs: "vision"), placed before "timings".
    """
    adapter, tokenizer = model.adapter, model.tokenizer
    steps, generated = run.steps, run.generated
    return {
        "model": str(model.name_or_path),
        "model_type": adapter.model_type,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "method": method,
        "attention": attention_label(adapter),
        "prompt": prompt,
        "chat": chat,
        "tokens": steps[-1]["tokens"],
        "prompt_tokens": steps[0]["tokens"],
        "generated_tokens": _token_texts(tokenizer, generated),
        "generated_text": tokenizer.decode(generated, skip_special_tokens=False),
        "stopped_at_eos": run.stopped_at_eos,
        "num_steps": len(steps),
        "num_layers": adapter.n_layers,
        "num_heads": adapter.n_heads,
        "num_kv_heads": adapter.n_kv_heads,
        "layers": layers,
        "exclude_first_token": exclude_first_token,
        "steps": steps,
        "variant_definitions": VARIANT_DEFINITIONS,
        "distance_definitions": DISTANCE_DEFINITIONS,
        **(extra or {}),
        "timings": {
            "load_seconds": round(load_seconds, 4),
            "step_seconds": [round(s, 4) for s in run.step_seconds],
            "total_seconds": round(time.perf_counter() - started, 4),
        },
    }


def attention_label(adapter: ArchitectureAdapter) -> str:
    """Which attention ran: the installed key selection (a DSA checkpoint's selector), or dense."""
    selection = adapter.selection
    return "dense (as trained)" if selection is None else selection.label


def _eos_ids(model: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.model.config, model.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return {int(i) for i in ids}


def masking_rows(step: int, result: SequenceMasking, token_texts: list[str], n_heads: int) -> pd.DataFrame:
    """Long-format rows, ordered layer > position > variant."""
    names = variant_names(n_heads)
    n_layers, n_positions, n_variants = result.l2.shape
    layer_col = np.repeat(np.asarray(result.layers), n_positions * n_variants)
    position_col = np.tile(np.repeat(np.asarray(result.positions), n_variants), n_layers)
    variant_col = np.tile(np.asarray(names, dtype=object), n_layers * n_positions)
    texts = np.asarray(token_texts, dtype=object)
    return pd.DataFrame(
        {
            "generation_step": np.full(layer_col.shape, step),
            "layer": layer_col,
            "token_masked": texts[position_col],
            "token_position": position_col,
            "variant": variant_col,
            "l2_distance": result.l2.reshape(-1),
            "cosine_distance": result.cosine.reshape(-1),
        }
    )
