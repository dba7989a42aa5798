"""Vision-language token masking (Qwen3-VL prompts with images) on a tiny random Qwen3-VL, checked by brute force.

The reference is the whole model run once per masked key, with an explicit additive 4D causal
mask and explicit MRoPE position ids; at the probed layer a pre-hook swaps in a mask that also
hides the key from the final query. Nothing of the fast path is reused by the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_vision_tiny_model import test_image, tiny_qwen3_vl

from sparse_viz.analysis.masking.final_position import masked_final_position_updates
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.vision import run_vision_masking_experiment
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.loading import LoadedModel
from sparse_viz.pretrained.vision import encode_vision_prompt

PROMPT = "What is in it?"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, processor = tiny_qwen3_vl(n_layers=3)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=ArchitectureAdapter.for_model(model),
        device=torch.device("cpu"),
        dtype=torch.float32,
        name_or_path="tiny-qwen3-vl",
    )
    return loaded, processor


def _inputs(tiny, images):
    loaded, processor = tiny
    return encode_vision_prompt(loaded.tokenizer, processor, PROMPT, images, chat=True)


def _causal_mask(n: int, hide: tuple[int, int] | None = None, both_ways: list[range] = ()) -> torch.Tensor:
    """Additive mask by loops: causal, plus key<->query pairs inside one of `both_ways`."""
    mask = torch.zeros(n, n)
    for q in range(n):
        for k in range(n):
            same_block = any(q in block and k in block for block in both_ways)
            if (k > q and not same_block) or (q, k) == hide:
                mask[q, k] = torch.finfo(torch.float32).min
    return mask[None, None]  # (1, 1, T, T)


@torch.no_grad()
def brute_force_updates(model, inputs, layer: int, positions: list[int], both_ways: list[range] = ()) -> torch.Tensor:
    """(1+P, D): layer output - layer input at the final position; row 0 unmasked."""
    model_inputs = inputs.model_inputs(model)
    n = inputs.input_ids.shape[1]
    decoder_layer = model.model.language_model.layers[layer]
    rows = []
    for masked in [None, *positions]:
        seen = {}

        def swap_mask(module, args, kwargs, masked=masked):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _causal_mask(n, None if masked is None else (n - 1, masked), both_ways)
            seen["in"] = (args[0] if args else kwargs["hidden_states"])[0, -1].clone()
            return args, kwargs

        handles = [
            decoder_layer.register_forward_pre_hook(swap_mask, with_kwargs=True),
            decoder_layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0, -1].clone())),
        ]
        try:
            model(input_ids=inputs.input_ids, attention_mask=_causal_mask(n, None, both_ways), use_cache=False, **model_inputs)
        finally:
            for handle in handles:
                handle.remove()
        rows.append(seen["out"] - seen["in"])
    return torch.stack(rows)


def _distances(updates: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    base, masked = updates[:1].double(), updates[1:].double()
    l2 = (masked - base).norm(dim=-1)
    cosine = 1 - torch.nn.functional.cosine_similarity(masked, base, dim=-1)
    return l2.numpy(), cosine.numpy()


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_fast_path_equals_whole_model_brute_force(tiny, kind):
    loaded, processor = tiny
    image = test_image(64, 64)
    results = run_vision_masking_experiment(PROMPT, [image], model=loaded, image_processor=processor, mask=kind)
    inputs = _inputs(tiny, [image])
    kinds = inputs.token_map.token_kinds
    positions = [p for p, k in enumerate(kinds) if (k == "image") == (kind == "vision")]
    assert sorted(results["token_position"].unique()) == positions
    for layer in range(loaded.adapter.n_layers):
        l2, cosine = _distances(brute_force_updates(loaded.model, inputs, layer, positions))
        full = results[(results.layer == layer) & (results.variant == "Full")].sort_values("token_position")
        np.testing.assert_allclose(full.l2_distance.to_numpy(), l2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(full.cosine_distance.to_numpy(), cosine, rtol=1e-4, atol=1e-5)
    # The image tokens matter: masking them changes the output (else the test proves nothing).
    if kind == "vision":
        assert results[results.variant == "Full"].l2_distance.max() > 1e-2


def test_baseline_logits_equal_the_models_own_forward(tiny):
    loaded, _ = tiny
    inputs = _inputs(tiny, [test_image(64, 64)])
    model_inputs = inputs.model_inputs(loaded.model)
    _, logits = capture_layer_inputs(loaded.adapter, inputs.input_ids, None, model_inputs)
    with torch.no_grad():  # the model computes its own MRoPE ids and causal mask here
        own = loaded.model(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            image_grid_thw=inputs.image_grid_thw,
            mm_token_type_ids=inputs.mm_token_type_ids,
        ).logits[0, -1]
    torch.testing.assert_close(logits, own, rtol=1e-5, atol=1e-5)


def test_deepstack_layer_inputs_come_from_pre_hooks_not_hidden_states(tiny):
    """After text layer 0 DeepStack adds features at image positions: hidden_states[1] is then
    NOT layer 1's input, and masking computed from it would disagree with the model."""
    loaded, _ = tiny
    inputs = _inputs(tiny, [test_image(64, 64)])
    model_inputs = inputs.model_inputs(loaded.model)
    captured, _ = capture_layer_inputs(loaded.adapter, inputs.input_ids, None, model_inputs)
    with torch.no_grad():
        hidden_states = loaded.model(
            input_ids=inputs.input_ids, output_hidden_states=True, use_cache=False, **model_inputs
        ).hidden_states
    image = torch.tensor([k == "image" for k in inputs.token_map.token_kinds])
    gap = (captured[1].hidden[0] - hidden_states[1][0]).abs().amax(dim=-1)  # (T,)
    assert gap[image].min() > 1e-3 and gap[~image].max() == 0  # DeepStack touched image tokens only

    positions = list(range(inputs.input_ids.shape[1] - 1))
    brute = brute_force_updates(loaded.model, inputs, 1, positions)
    from_hooks = masked_final_position_updates(loaded.adapter, 1, captured[1], positions).full
    torch.testing.assert_close(from_hooks, brute, rtol=1e-5, atol=1e-5)
    wrong_input = type(captured[1])(hidden=hidden_states[1], kwargs=captured[1].kwargs)
    from_hidden_states = masked_final_position_updates(loaded.adapter, 1, wrong_input, positions).full
    assert not torch.allclose(from_hidden_states, brute, rtol=1e-3, atol=1e-3)


def test_text_mask_never_emits_image_positions_and_vision_only_image_positions(tiny):
    loaded, processor = tiny
    images = [test_image(64, 64), test_image(96, 64, seed=1)]
    text = run_vision_masking_experiment(PROMPT, images, model=loaded, image_processor=processor, mask="text", num_tokens=2)
    vision = run_vision_masking_experiment(PROMPT, images, model=loaded, image_processor=processor, mask="vision")
    assert set(text.token_kind) <= {"text", "special"} and (text.image_index == -1).all()
    assert set(vision.token_kind) == {"image"}
    assert set(vision.image_index) == {0, 1}
    token_map = vision.attrs["metadata"]["vision"]["token_map"]
    image_positions = {p for start, stop in token_map["ranges"] for p in range(start, stop)}
    assert set(vision.token_position) == image_positions
    assert not set(text.token_position) & image_positions
    # Generated tokens (step 1) are text and are masked under --mask text.
    assert text.generation_step.max() == 1
    # grid cells: image 1 is 96x64 px -> 2 rows x 3 cols of 32-px tokens, row-major.
    second = vision[(vision.image_index == 1) & (vision.layer == 0) & (vision.variant == "Full")]
    start = token_map["ranges"][1][0]
    assert list(zip(second.grid_row, second.grid_col)) == [(r, c) for r in range(2) for c in range(3)]
    assert list(second.token_position) == list(range(start, start + 6))


def test_bad_requests_are_one_line_errors(tiny):
    loaded, processor = tiny
    with pytest.raises(UserInputError, match="--mask vision needs at least one --image"):
        run_vision_masking_experiment(PROMPT, [], model=loaded, image_processor=processor, mask="vision")
    with pytest.raises(UserInputError, match="unknown --mask"):
        run_vision_masking_experiment(PROMPT, [], model=loaded, image_processor=processor, mask="pixels")


def test_bidirectional_counterfactual_equals_brute_force_and_differs_from_the_model(tiny):
    loaded, processor = tiny
    images = [test_image(64, 64), test_image(64, 96, seed=1)]
    inputs = _inputs(tiny, images)
    blocks = [range(im.start, im.stop) for im in inputs.token_map.images]
    both = run_vision_masking_experiment(
        PROMPT, images, model=loaded, image_processor=processor, mask="all", vision_attention="bidirectional"
    )
    causal = run_vision_masking_experiment(PROMPT, images, model=loaded, image_processor=processor, mask="all")
    assert "COUNTERFACTUAL" in both.attrs["metadata"]["vision"]["attention"]
    positions = list(range(inputs.input_ids.shape[1]))
    for layer in (1, 2):  # layer 0's input is the embedding: same either way
        l2, _ = _distances(brute_force_updates(loaded.model, inputs, layer, positions, both_ways=blocks))
        full = both[(both.layer == layer) & (both.variant == "Full")].sort_values("token_position")
        np.testing.assert_allclose(full.l2_distance.to_numpy(), l2, rtol=1e-5, atol=1e-5)
        other = causal[(causal.layer == layer) & (causal.variant == "Full")].sort_values("token_position")
        assert np.abs(other.l2_distance.to_numpy() - l2).max() > 1e-3


def test_text_only_prompt_on_the_vl_model_equals_brute_force(tiny):
    loaded, processor = tiny
    results = run_vision_masking_experiment(PROMPT, [], model=loaded, image_processor=processor)
    inputs = _inputs(tiny, [])
    positions = list(range(inputs.input_ids.shape[1]))
    assert sorted(results.token_position.unique()) == positions and set(results.token_kind) == {"text", "special"}
    for layer in range(loaded.adapter.n_layers):
        l2, _ = _distances(brute_force_updates(loaded.model, inputs, layer, positions))
        full = results[(results.layer == layer) & (results.variant == "Full")].sort_values("token_position")
        np.testing.assert_allclose(full.l2_distance.to_numpy(), l2, rtol=1e-5, atol=1e-5)
