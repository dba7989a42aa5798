"""Token masking impact (seed 000), exact and fast.

Question: at layer L, how much does the final position's residual-stream update change when
the final query may not attend to key j? Masking key j for the final query at layer L changes
only the final position of layer L (earlier queries and other layers are untouched), so from
one baseline forward that caches every layer's input, the masked updates of ALL keys j come
from one batched computation per layer:

    scores  s = q_last . K^T * scaling                       (H, T)
    S[p]    = s with key positions[p] set to -inf            (H, 1+P, T)  row 0: nothing masked
    z       = softmax(S) @ V                                 (1+P, H, hd)
    Attn    = o_proj(z);  Head_h = z_h @ W_o[:, h*hd:(h+1)*hd]^T
    Full    = (h + Attn + MLP(post_norm(h + Attn))) - h      MLP batched over the 1+P rows

The masked rows are computed directly, not as `(o - p_j v_j) / (1 - p_j)`: that subtraction
cancels catastrophically when one key holds ~all the mass (attention sinks). The readable
brute-force path (`method="reference"`, one layer call per masked key with an additive 4D
mask) is in `token_masking_reference.py`.

Distances between baseline (row 0) and masked rows, per variant, at the final position:
`l2_distance = ||d_base - d_masked||_2` and `cosine_distance = 1 - cos(d_base, d_masked)`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sparse_viz.analysis.loading import ArchitectureAdapter, LoadedModel, load_model
from sparse_viz.analysis.prompts import encode_prompt
from sparse_viz.errors import UserInputError
from sparse_viz.report.masking import RESULT_COLUMNS, render_masking_report  # columns defined once there

# Written after RESULT_COLUMNS when present (vision-language runs, `analysis.vision_masking`).
OPTIONAL_COLUMNS = ("token_kind", "image_index", "grid_row", "grid_col")
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


# -- one baseline forward: every layer's input, captured by pre-hooks ----------------------------


@dataclass
class LayerInput:
    """What layer i received in the baseline forward.

    Attributes:
        hidden: (1, T, D) the layer's input hidden states.
        kwargs: the keyword arguments the model passed to the layer (position_embeddings,
            attention_mask, position_ids, ...), so the layer can be called again alone.
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any]

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (1, T, hd)."""
        return self.kwargs["position_embeddings"]


@torch.no_grad()
def capture_layer_inputs(
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    layers: Sequence[int] | None = None,
    model_inputs: dict[str, Any] | None = None,
) -> tuple[dict[int, LayerInput], torch.Tensor]:
    """Run the model once; return the inputs of `layers` and the final position's logits.

    Pre-hooks (not `hidden_states`) because Qwen3-VL adds DeepStack features between layers and
    `hidden_states[-1]` already has the final norm applied.

    Args:
        adapter: the model's adapter.
        input_ids: (1, T) token ids on the model's device.
        layers: layer indices to capture (default all).
        model_inputs: extra keyword arguments for the model's forward (Qwen3-VL: pixel_values,
            image_grid_thw, mm_token_type_ids, position_ids; see `analysis.vision`).

    Returns:
        ({layer: LayerInput}, logits (V,) at the final position).
    """
    wanted = set(range(adapter.n_layers) if layers is None else layers)
    captured: dict[int, LayerInput] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = LayerInput(hidden=hidden.detach(), kwargs=dict(kwargs))

        return hook

    handles = [
        adapter.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in sorted(wanted)
    ]
    try:
        output = adapter.model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **(model_inputs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return captured, output.logits[0, -1]


# -- the fast path ------------------------------------------------------------------------------


@dataclass
class FinalPositionUpdates:
    """Updates of the residual stream at the final position; row 0 = baseline (no key masked),
    row 1+p = key `positions[p]` masked.

    Attributes:
        full: (1+P, D) layer output - layer input.
        attn: (1+P, D) attention output after o_proj.
        heads: (1+P, H, D) each query head's contribution (its o_proj column block times z_h).
    """

    full: torch.Tensor
    attn: torch.Tensor
    heads: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (non-interleaved) RoPE, as in Llama/Qwen: x (B, H, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


def visible_keys(n_keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Keys the final query may attend to under the model's own mask: (T,) bool."""
    positions = torch.arange(n_keys, device=device)
    if window is None:
        return torch.ones(n_keys, dtype=torch.bool, device=device)
    # Same rule as transformers' sliding window: q - k < window.
    return (n_keys - 1) - positions < window


@torch.no_grad()
def masked_final_position_updates(
    adapter: ArchitectureAdapter,
    layer: int,
    layer_input: LayerInput,
    positions: Sequence[int],
    mask_value: float = float("-inf"),
) -> FinalPositionUpdates:
    """Layer `layer`'s final-position updates with each key of `positions` masked, all at once.

    Args:
        adapter: the model's adapter.
        layer: layer index.
        layer_input: the layer's cached input (hidden (1, T, D) and position embeddings).
        positions: P key positions to mask, one per masked row.
        mask_value: added to the masked key's score; -inf masks it, 0.0 is the identity mask
            (every row then equals the baseline row bit for bit: used by the tests).

    Returns:
        FinalPositionUpdates with 1+P rows (row 0 = baseline).
    """
    attention = adapter.attention(layer)
    hidden = layer_input.hidden  # (1, T, D)
    _, n_tokens, _ = hidden.shape
    n_heads, n_kv, head_dim = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim
    group = n_heads // n_kv
    cos, sin = layer_input.position_embeddings  # (1, T, hd) each

    x = adapter.input_norm(layer)(hidden)  # (1, T, D)
    q = attention.q_proj(x[:, -1:]).view(1, 1, n_heads, head_dim)  # (1, 1, H, hd)
    k = attention.k_proj(x).view(1, n_tokens, n_kv, head_dim)  # (1, T, Hkv, hd)
    v = attention.v_proj(x).view(1, n_tokens, n_kv, head_dim)  # (1, T, Hkv, hd)
    q_norm, k_norm = adapter.q_norm(layer), adapter.k_norm(layer)
    if q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    q = apply_rope(q.transpose(1, 2), cos[:, -1:], sin[:, -1:])  # (1, H, 1, hd)
    k = apply_rope(k.transpose(1, 2), cos, sin)  # (1, Hkv, T, hd)
    v = v.transpose(1, 2)  # (1, Hkv, T, hd)

    # GQA: query head h reads KV head h // group.
    q = q.view(n_kv, group, head_dim)  # (Hkv, G, hd)
    scores = torch.einsum("kgd,ktd->kgt", q, k[0]) * adapter.attention_scaling  # (Hkv, G, T)
    visible = visible_keys(n_tokens, adapter.sliding_window(layer), hidden.device)  # (T,)
    scores = scores.masked_fill(~visible, float("-inf"))

    n_rows = 1 + len(positions)
    rows = scores.unsqueeze(2).repeat(1, 1, n_rows, 1)  # (Hkv, G, 1+P, T)
    row_index = torch.arange(1, n_rows, device=hidden.device)
    key_index = torch.as_tensor(list(positions), dtype=torch.long, device=hidden.device)
    # The diagonal of the [P, T] block: row 1+p loses key positions[p]. Added like the model's
    # additive mask, so mask_value=0.0 is an exact identity through the same code path.
    rows[:, :, row_index, key_index] += mask_value
    # Softmax in float32 as the eager attention does, then back to the model's dtype.
    probs = F.softmax(rows, dim=-1, dtype=torch.float32).to(v.dtype)  # (Hkv, G, 1+P, T)
    z = torch.einsum("kgrt,ktd->rkgd", probs, v[0])  # (1+P, Hkv, G, hd)
    z = z.reshape(n_rows, n_heads * head_dim)  # (1+P, H*hd) head-major, as o_proj expects

    attn = attention.o_proj(z)  # (1+P, D)
    w_o = attention.o_proj.weight.view(-1, n_heads, head_dim)  # (D, H, hd)
    heads = torch.einsum("rhd,Dhd->rhD", z.view(n_rows, n_heads, head_dim), w_o)  # (1+P, H, D)

    residual = hidden[0, -1]  # (D,)
    mid = residual + attn  # (1+P, D)
    out = mid + adapter.mlp(layer)(adapter.post_attention_norm(layer)(mid))  # (1+P, D)
    return FinalPositionUpdates(full=out - residual, attn=attn, heads=heads)


# -- distances ---------------------------------------------------------------------------------


def variant_names(n_heads: int) -> list[str]:
    return ["Full", "Attn"] + [f"Head_{h}" for h in range(n_heads)]


def update_distances(updates: FinalPositionUpdates) -> tuple[np.ndarray, np.ndarray]:
    """L2 and cosine distances of every masked row to the baseline row, per variant.

    Returns:
        (l2, cosine), each (P, 2+H) float64: columns Full, Attn, Head_0..Head_{H-1}.
    """
    stacked = torch.cat([updates.full[:, None], updates.attn[:, None], updates.heads], dim=1)  # (1+P, V, D)
    stacked = stacked.double()
    base, masked = stacked[:1], stacked[1:]  # (1, V, D), (P, V, D)
    l2 = (masked - base).norm(dim=-1)  # (P, V)
    # 1 - cos as half the squared distance of unit vectors: no cancellation near cos = 1,
    # and exactly 0 when the vectors are identical.
    tiny = torch.finfo(torch.float64).tiny
    unit_base = base / base.norm(dim=-1, keepdim=True).clamp_min(tiny)
    unit_masked = masked / masked.norm(dim=-1, keepdim=True).clamp_min(tiny)
    cosine = 0.5 * (unit_masked - unit_base).pow(2).sum(dim=-1)  # (P, V)
    return l2.cpu().numpy(), cosine.cpu().numpy()


# -- one sequence, every selected layer --------------------------------------------------------


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
    if method == "reference":
        from sparse_viz.analysis.token_masking_reference import reference_final_position_updates as compute
    else:
        compute = masked_final_position_updates
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


# -- the experiment: generation steps, rows, metadata ------------------------------------------


def _as_indices(spec: str | Sequence[int] | None, size: int, what: str) -> list[int] | None:
    from sparse_viz.analysis.cli import parse_index_spec

    if spec is None or isinstance(spec, str):
        return parse_index_spec(spec, size, what)
    indices = sorted({int(i) for i in spec})
    if any(i < 0 or i >= size for i in indices):
        raise UserInputError(f"bad {what}: {list(spec)} has indices outside 0-{size - 1}")
    return indices


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

    Returns:
        DataFrame with the columns of RESULT_COLUMNS; `df.attrs["metadata"]` holds the run's
        metadata (model, prompt, tokens, generated text, definitions, timings).

    Raises:
        UserInputError: bad model, prompt, num_tokens, layers, positions, method, dtype, device.
    """
    from sparse_viz.analysis.prompts import read_prompt

    started = time.perf_counter()
    if num_tokens < 1:
        raise UserInputError(f"num_tokens must be >= 1, got {num_tokens}")
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    prompt = read_prompt(prompt)
    if model is None:
        if model_name is None:
            raise UserInputError("no model given (model_name or model)")
        model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - started
    adapter, tokenizer = model.adapter, model.tokenizer

    layer_list = _as_indices(layers, adapter.n_layers, "layers") or list(range(adapter.n_layers))
    input_ids = encode_prompt(
        tokenizer, prompt, chat=chat, max_positions=adapter.max_positions, min_tokens=2, reserve=num_tokens - 1
    ).to(model.device)
    n_prompt = input_ids.shape[1]
    position_list = _as_indices(positions, n_prompt, "positions")

    def analyse_step(step: int, input_ids: torch.Tensor, bar: Any) -> tuple[SequenceMasking, pd.DataFrame, dict]:
        step_positions = list(range(input_ids.shape[1])) if position_list is None else list(position_list)
        if exclude_first_token:
            step_positions = [p for p in step_positions if p != 0]
        if not step_positions:
            raise UserInputError("no key positions left to mask")
        result = analyse_sequence(adapter, input_ids, layer_list, step_positions, method, progress=bar)
        record = step_record(tokenizer, step, input_ids[0].tolist(), result.next_token)
        return result, _rows(step, result, record["tokens"], adapter.n_heads), record

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


def _eos_ids(model: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.model.config, model.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return {int(i) for i in ids}


def _rows(step: int, result: SequenceMasking, token_texts: list[str], n_heads: int) -> pd.DataFrame:
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


# -- outputs -----------------------------------------------------------------------------------


def results_to_json(results: pd.DataFrame) -> dict:
    """Columnar JSON of the long-format rows: {"columns": {name: [values...]}, "num_rows": N}."""
    columns = {}
    for name in _output_columns(results):
        values = results[name].tolist()
        if name.endswith("_distance") or name in OPTIONAL_COLUMNS:
            values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        columns[name] = values
    return {"format": "columnar", "num_rows": len(results), "columns": columns}


def _output_columns(results: pd.DataFrame) -> list[str]:
    return list(RESULT_COLUMNS) + [name for name in OPTIONAL_COLUMNS if name in results.columns]


def write_masking_outputs(
    output_dir: str | os.PathLike,
    results: pd.DataFrame,
    metadata: dict,
    report: bool = True,
    extra_outputs: Any = None,
) -> Path:
    """Write masking_results.csv/.json, metadata.json and report.html into `output_dir`.

    `extra_outputs(staging_dir)`, when given, writes further files (heatmaps, vision report)
    into the same staging directory, so they are moved in atomically with the rest.

    Everything is written into a temp dir beside `output_dir` and moved in at the end, so a
    failure leaves no half-written output; an existing `output_dir` is replaced.

    Returns:
        The output directory.

    Raises:
        UserInputError: the output location cannot be written.
    """
    output = Path(output_dir)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    except OSError as error:
        raise UserInputError(f"cannot write output directory {str(output)!r}: {error.strerror or error}") from error
    try:
        results.loc[:, _output_columns(results)].to_csv(staging / "masking_results.csv", index=False)
        (staging / "masking_results.json").write_text(
            json.dumps(results_to_json(results), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        (staging / "metadata.json").write_text(
            json.dumps(metadata, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
        )
        if report:
            _write_report(staging, results, metadata)
        if extra_outputs is not None:
            extra_outputs(staging)
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _write_report(directory: Path, results: pd.DataFrame, metadata: dict) -> None:
    render_masking_report(directory, results, metadata)


def _replace_dir(staging: Path, output: Path) -> None:
    """Move `staging` to `output`, replacing an existing directory with two renames."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)
