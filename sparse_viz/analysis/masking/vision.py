"""Token masking on Qwen3-VL prompts (text and images): seed 001 on the exact fast path.

The masking itself is `experiment.analyse_sequence`, unchanged: the baseline forward gets the
images, `mm_token_type_ids` and the MRoPE position ids (computed once per step with the model's
own `get_rope_index`), and the layer inputs are captured with pre-hooks, so the DeepStack
features added after the first text layers are part of what later layers see. The model's own
causal mask is used: Qwen3-VL's language model attends causally over vision tokens too
(REFERENCE §2), so seed 001's "bidirectional vision" mask is not reproduced.

`--mask text` (default) masks every non-image position, `vision` only image tokens, `all`
everything. Rows gain `token_kind` (text / image / special) and, for image tokens,
`image_index`, `grid_row`, `grid_col` (on the merged patch grid).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sparse_viz.analysis.index_spec import as_indices
from sparse_viz.analysis.masking.experiment import (
    METHODS,
    SequenceMasking,
    analyse_sequence,
    greedy_masking_steps,
    masking_metadata,
    masking_rows,
    step_record,
)
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.loading import LoadedModel, load_model
from sparse_viz.pretrained.vision import (
    VisionInputs,
    build_image_processor,
    describe_token_map,
    encode_vision_prompt,
    is_vision_model,
    load_image,
)

MASK_KINDS = ("text", "vision", "all")
VISION_ATTENTION = {
    "causal": "the model's own causal mask (vision tokens included), as Qwen3-VL runs",
    "bidirectional": "COUNTERFACTUAL: tokens of one image attend to each other both ways in every "
    "layer (a common assumption about vision tokens); Qwen3-VL itself is causal, so these numbers do not "
    "describe the model",
}


def check_mask_request(mask: str, n_images: int) -> None:
    """Cheap checks before any model loads.

    Raises:
        UserInputError: unknown mask kind, or `vision` without an image.
    """
    if mask not in MASK_KINDS:
        raise UserInputError(f"unknown --mask {mask!r}; use one of: {', '.join(MASK_KINDS)}")
    if mask == "vision" and n_images == 0:
        raise UserInputError("--mask vision needs at least one --image")


def add_token_map_columns(rows: pd.DataFrame, inputs: VisionInputs) -> pd.DataFrame:
    """Add token_kind and, for image tokens, image_index / grid_row / grid_col (else -1)."""
    token_map = inputs.token_map
    n = len(token_map.token_kinds)
    kind = np.asarray(token_map.token_kinds, dtype=object)
    image_index = np.full(n, -1)
    grid_row = np.full(n, -1)
    grid_col = np.full(n, -1)
    for image in token_map.images:
        positions = np.arange(image.start, image.stop)
        image_index[positions] = image.image_index
        offsets = positions - image.start
        grid_row[positions] = offsets // image.grid_cols
        grid_col[positions] = offsets % image.grid_cols
    position = rows["token_position"].to_numpy()
    return rows.assign(
        token_kind=kind[position],
        image_index=image_index[position],
        grid_row=grid_row[position],
        grid_col=grid_col[position],
    )


def check_vision_request(num_tokens: int, method: str, mask: str, n_images: int, vision_attention: str) -> None:
    """Every check that needs no model, so bad input fails before one loads.

    Raises:
        UserInputError: num_tokens < 1, unknown method, mask kind or vision attention, or
            `vision` without an image.
    """
    if num_tokens < 1:
        raise UserInputError(f"num_tokens must be >= 1, got {num_tokens}")
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    check_mask_request(mask, n_images)
    if vision_attention not in VISION_ATTENTION:
        raise UserInputError(f"unknown --vision-attention {vision_attention!r}; use one of: {', '.join(VISION_ATTENTION)}")


def require_vision_model(
    model: LoadedModel | None, model_name: str | os.PathLike | None, device: str, dtype: str, trust_remote_code: bool
) -> LoadedModel:
    """`model`, or the checkpoint `model_name` loaded; either must be a Qwen3-VL model.

    Raises:
        UserInputError: no model, a checkpoint that cannot load, or a text-only model.
    """
    if model is None:
        if model_name is None:
            raise UserInputError("no model given (model_name or model)")
        model = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if not is_vision_model(model.model):
        raise UserInputError(
            f"model {str(model.name_or_path)!r} is a text-only model ({model.adapter.model_type}); "
            "images need a Qwen3-VL checkpoint"
        )
    return model


def run_vision_masking_experiment(
    prompt: str,
    images: Sequence[str | os.PathLike] = (),
    model_name: str | os.PathLike | None = None,
    mask: str = "text",
    device: str = "auto",
    dtype: str = "float32",
    num_tokens: int = 1,
    layers: str | Sequence[int] | None = None,
    exclude_first_token: bool = False,
    chat: bool = True,
    method: str = "fast",
    trust_remote_code: bool = False,
    progress: bool = False,
    model: LoadedModel | None = None,
    image_processor: Any = None,
    verbose: bool = False,
    vision_attention: str = "causal",
) -> pd.DataFrame:
    """Token masking impact of a Qwen3-VL prompt with images, per step, layer, position, variant.

    Args:
        prompt: prompt text.
        images: image file paths, in prompt order (PIL images are accepted too).
        model_name: Qwen3-VL model directory or hub id (ignored when `model` is given).
        mask: "text" (every non-image position), "vision" (image tokens) or "all".
        device, dtype, num_tokens, layers, exclude_first_token, method, trust_remote_code,
            progress: as in `experiment.run_masking_experiment`.
        chat: render with the chat template (default for VL models).
        model: an already loaded model to reuse.
        image_processor: reuse one (default: the checkpoint's, see `build_image_processor`).
        verbose: print seed 001's "Vision token ranges" lines.
        vision_attention: "causal" (default: the model's own mask) or "bidirectional", a
            COUNTERFACTUAL where tokens of one image attend to each other both ways in every
            layer (seed 001's assumption; not what Qwen3-VL does), labelled so in the metadata.

    Returns:
        DataFrame with the masking RESULT_COLUMNS plus token_kind, image_index, grid_row,
        grid_col; `attrs["metadata"]` as the text experiment's plus `vision` (token map, mask kind),
        and `attrs["images"]` the resized PIL images (for heatmaps).

    Raises:
        UserInputError: bad image, image given to a text-only model, `--mask vision` without
            an image, and the text experiment's bad inputs.
    """
    started = time.perf_counter()
    check_vision_request(num_tokens, method, mask, len(images), vision_attention)
    pictures = [image if hasattr(image, "convert") else load_image(image) for image in images]
    model = require_vision_model(model, model_name, device, dtype, trust_remote_code)
    load_seconds = time.perf_counter() - started
    adapter, tokenizer = model.adapter, model.tokenizer
    image_processor = image_processor or build_image_processor(model.model, model.name_or_path)

    layer_list = as_indices(layers, adapter.n_layers, "layers") or list(range(adapter.n_layers))
    inputs = encode_for_masking(model, image_processor, prompt, pictures, chat, num_tokens, mask, verbose)

    def analyse_step(step: int, step_inputs: VisionInputs, bar: Any) -> tuple[SequenceMasking, pd.DataFrame, dict]:
        positions = step_inputs.token_map.positions(mask)
        if exclude_first_token:
            positions = [p for p in positions if p != 0]
        if not positions:
            raise UserInputError(f"no {mask} positions left to mask")
        result = analyse_sequence(
            adapter,
            step_inputs.input_ids,
            layer_list,
            positions,
            method,
            progress=bar,
            model_inputs=step_inputs.model_inputs(model.model, vision_attention),
        )
        ids = step_inputs.input_ids[0].tolist()
        record = step_record(tokenizer, step, ids, result.next_token, token_kinds=step_inputs.token_map.token_kinds)
        return result, add_token_map_columns(masking_rows(step, result, record["tokens"], adapter.n_heads), step_inputs), record

    run = greedy_masking_steps(
        model, inputs, num_tokens, len(layer_list), progress, analyse_step, lambda sequence, token: sequence.appended(token)
    )
    results = pd.concat(run.frames, ignore_index=True)
    results.attrs["images"] = inputs.images
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
        extra={"vision": vision_metadata(mask, images, vision_attention, inputs)},
    )
    return results


def encode_for_masking(
    model: LoadedModel, image_processor: Any, prompt: str, pictures: list[Any], chat: bool, num_tokens: int,
    mask: str, verbose: bool,
) -> VisionInputs:
    """The prompt and images as model inputs on the model's device, with room for the generated
    tokens; `verbose` prints seed 001's token-range lines and how many positions get masked.

    Raises:
        UserInputError: the prompt is too long for the context, or shorter than 2 tokens.
    """
    inputs = encode_vision_prompt(
        model.tokenizer,
        image_processor,
        prompt,
        pictures,
        chat=chat,
        max_positions=model.adapter.max_positions,
        reserve=num_tokens - 1,
    ).to(model.device, model.dtype)
    if inputs.input_ids.shape[1] < 2:
        raise UserInputError("the prompt has fewer than 2 tokens")
    if verbose:
        print(describe_token_map(inputs.token_map))
        n_tokens = inputs.input_ids.shape[1]
        print(f"Tokenized ({n_tokens} tokens), {len(pictures)} image(s); masking {mask} tokens: "
              f"{len(inputs.token_map.positions(mask))} position(s)")
    return inputs


def vision_metadata(mask: str, images: Sequence[Any], vision_attention: str, inputs: VisionInputs) -> dict[str, Any]:
    """metadata["vision"]: what was masked, which images, which attention, the token map."""
    return {
        "mask": mask,
        "images": [str(image) if not hasattr(image, "convert") else "<PIL image>" for image in images],
        "vision_attention": vision_attention,
        "attention": VISION_ATTENTION[vision_attention],
        "token_map": inputs.token_map.to_json(),
    }


def vision_baseline_logits(model: LoadedModel, inputs: VisionInputs) -> torch.Tensor:
    """Final-position logits (V,) of the forward the masking analysis uses (explicit MRoPE ids)."""
    _, logits = capture_layer_inputs(model.adapter, inputs.input_ids, [0], inputs.model_inputs(model.model))
    return logits
