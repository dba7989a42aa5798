"""All-pairs attention impact: every (query, key) pair of every layer, checked against one layer
call per pair with an explicit additive mask, and against the final-position masking path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3
from transformers import MistralConfig, MistralForCausalLM

from sparse_viz.analysis.masking.all_pairs import all_pairs_attention_impact
from sparse_viz.analysis.masking.final_position import masked_final_position_updates, update_distances
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.reference import reference_all_pairs_impact
from sparse_viz.pretrained.adapter import ArchitectureAdapter

PROMPT = "The cat sat on the mat, and"


def layer_inputs(model, tokenizer, prompt=PROMPT):
    adapter = ArchitectureAdapter.for_model(model)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    inputs, _ = capture_layer_inputs(adapter, input_ids)
    return adapter, inputs, input_ids.shape[1]


def assert_matches_reference(adapter, inputs, layer, block_size):
    fast = all_pairs_attention_impact(adapter, layer, inputs[layer], block_size=block_size)
    slow = reference_all_pairs_impact(adapter, layer, inputs[layer])
    T = slow.l2.shape[0]
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    lower[0, 0] = False  # hiding query 0's only key leaves it nothing: undefined on both sides
    assert torch.isnan(fast.l2[~lower]).all() and torch.isnan(fast.cosine[~lower]).all()
    scale = slow.l2[lower].max()
    torch.testing.assert_close(fast.l2[lower].double(), slow.l2[lower], rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(fast.cosine[lower].double(), slow.cosine[lower], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.attention_mass, slow.attention_mass, rtol=1e-5, atol=1e-6)
    return fast, slow


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("block_size", [3, 64])  # a block that does not divide T, and one larger than T
def test_every_pair_of_every_layer_equals_one_masked_layer_call(family, block_size):
    model, tokenizer = (tiny_qwen3 if family == "qwen3" else tiny_llama)()  # GQA 4/2; llama with biases
    adapter, inputs, _ = layer_inputs(model, tokenizer)
    for layer in range(adapter.n_layers):
        assert_matches_reference(adapter, inputs, layer, block_size)


def test_the_last_row_is_the_final_position_paths_attn_variant():
    model, tokenizer = tiny_qwen3()
    adapter, inputs, T = layer_inputs(model, tokenizer)
    for layer in range(adapter.n_layers):
        impact = all_pairs_attention_impact(adapter, layer, inputs[layer], block_size=4)
        l2, cosine = update_distances(masked_final_position_updates(adapter, layer, inputs[layer], range(T)))
        torch.testing.assert_close(impact.l2[-1].double(), torch.from_numpy(l2[:, 1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(impact.cosine[-1].double(), torch.from_numpy(cosine[:, 1]), rtol=1e-4, atol=1e-7)


def test_sink_keys_holding_almost_all_the_mass_stay_finite_and_exact():
    """p -> 1: p / (1 - p) and z - v_s both degenerate there; the exact vector path takes over."""
    model, tokenizer = tiny_llama(attention_bias=False)
    with torch.no_grad():  # sharpen layer 0's attention until single keys take ~all of a row's mass
        model.model.layers[0].self_attn.q_proj.weight.mul_(40.0)
    adapter, inputs, T = layer_inputs(model, tokenizer)
    captured = {}
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("p", out[1]))
    with torch.no_grad():
        model(input_ids=tokenizer(PROMPT, return_tensors="pt")["input_ids"], use_cache=False)
    hook.remove()
    assert (captured["p"][0, :, 1:].amax(-1) > 1 - 1e-4).sum() > T  # the case under test occurs, many rows
    fast, _ = assert_matches_reference(adapter, inputs, 0, block_size=4)
    assert torch.isfinite(fast.l2[1:].tril()).all()


def test_keys_outside_a_sliding_window_have_no_impact():
    _, tokenizer = tiny_qwen3()
    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, max_position_embeddings=64,
        attn_implementation="eager")).eval()
    adapter, inputs, T = layer_inputs(windowed, tokenizer)
    assert adapter.sliding_window(0) == 3
    fast, _ = assert_matches_reference(adapter, inputs, 0, block_size=5)
    t, s = np.tril_indices(T)
    outside = torch.from_numpy(t - s >= 3)
    assert (fast.l2[t, s][outside] == 0).all() and (fast.l2[t, s][~outside][1:] > 0).all()
