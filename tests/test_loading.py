"""Model loading and architecture adapters: every family's parts are where the adapter says."""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from sparse_viz.analysis.cli import resolve_prompt
from sparse_viz.analysis.index_spec import parse_index_spec
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import SUPPORTED_ARCHITECTURES, ArchitectureAdapter
from sparse_viz.pretrained.loading import load_model
from sparse_viz.pretrained.prompts import DEFAULT_PROMPT

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny_qwen3_vl() -> Qwen3VLForConditionalGeneration:
    """Tiny Qwen3-VL from REFERENCE §2 (transformers' own test sizes)."""
    config = Qwen3VLConfig(
        text_config=dict(**SMALL, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                           spatial_merge_size=2, out_hidden_size=32, deepstack_visual_indexes=[0, 1]),
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def families():
    return {
        "qwen3": tiny_qwen3()[0],
        "llama": tiny_llama()[0],
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**SMALL)),
        "mistral": MistralForCausalLM(MistralConfig(**SMALL, head_dim=8)),
        "qwen3_vl": tiny_qwen3_vl(),
    }


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral", "qwen3_vl"])
def test_adapter_points_at_the_models_own_modules(family):
    model = families()[family]
    adapter = ArchitectureAdapter.for_model(model)
    text = model.model.language_model if family == "qwen3_vl" else model.model
    assert adapter.layers is text.layers and adapter.n_layers == len(text.layers)
    assert adapter.rotary_emb is text.rotary_emb
    assert adapter.final_norm is text.norm and adapter.embed_tokens is text.embed_tokens
    assert adapter.lm_head is model.lm_head
    assert (adapter.n_heads, adapter.n_kv_heads, adapter.head_dim, adapter.hidden_size) == (4, 2, 8, 32)
    assert adapter.attention_scaling == pytest.approx(8**-0.5)
    for i in range(adapter.n_layers):
        layer = text.layers[i]
        assert adapter.attention(i) is layer.self_attn
        assert all(hasattr(adapter.attention(i), p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert adapter.input_norm(i) is layer.input_layernorm
        assert adapter.post_attention_norm(i) is layer.post_attention_layernorm
        assert adapter.mlp(i) is layer.mlp
        has_qk_norm = family in ("qwen3", "qwen3_vl")
        assert (adapter.q_norm(i) is layer.self_attn.q_norm) if has_qk_norm else adapter.q_norm(i) is None
        assert (adapter.k_norm(i) is layer.self_attn.k_norm) if has_qk_norm else adapter.k_norm(i) is None


def test_qwen3_vl_text_masking_matches_brute_force():
    """The fast path on Qwen3-VL text (MRoPE position embeddings taken from the model's call)."""
    from sparse_viz.analysis.masking.final_position import masked_final_position_updates
    from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
    from sparse_viz.analysis.masking.reference import reference_final_position_updates

    torch.manual_seed(0)
    model = tiny_qwen3_vl()
    adapter = ArchitectureAdapter.for_model(model)
    input_ids = torch.randint(0, 64, (1, 7))
    inputs, _ = capture_layer_inputs(adapter, input_ids)
    for layer in range(adapter.n_layers):
        fast = masked_final_position_updates(adapter, layer, inputs[layer], range(7))
        slow = reference_final_position_updates(adapter, layer, inputs[layer], range(7))
        for name in ("full", "attn", "heads"):
            expected = getattr(slow, name)
            torch.testing.assert_close(getattr(fast, name), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


def test_unsupported_architecture_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(UserInputError, match="supported: " + ", ".join(SUPPORTED_ARCHITECTURES)):
        ArchitectureAdapter.for_model(model)


def test_load_model_from_a_saved_directory(tiny_model_dirs):
    loaded = load_model(tiny_model_dirs["qwen3"], device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.device == torch.device("cpu") and not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.adapter.layers is loaded.model.model.layers
    original, tokenizer = tiny_qwen3()
    ids = tokenizer("abc", return_tensors="pt")["input_ids"]
    assert loaded.tokenizer("abc", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    reloaded = load_model(tiny_model_dirs["qwen3"], device="auto")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, original(ids).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name_or_path": "/no/such/model"}, "does not exist"),
        ({"dtype": "float64"}, "unknown dtype 'float64'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_load_model_bad_input(kwargs, message, tiny_model_dirs):
    kwargs = {"name_or_path": tiny_model_dirs["llama"], **kwargs}
    with pytest.raises(UserInputError, match=message):
        load_model(**kwargs)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_parse_index_spec():
    assert parse_index_spec("0,3,5-7", 10) == [0, 3, 5, 6, 7]
    assert parse_index_spec("7-7, 2", 10) == [2, 7]
    assert parse_index_spec(None, 10) is None and parse_index_spec("all", 10) is None
    assert parse_index_spec("-1", 10) == [9] and parse_index_spec("-3--1, 0", 10) == [0, 7, 8, 9]  # from the end
    for bad in ("", "a", "3-1", "1-2-3", "10", "-11", "-1-0", "0,,1"):
        with pytest.raises(UserInputError, match="bad --layers spec"):
            parse_index_spec(bad, 10)


def test_resolve_prompt_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(prompt=None, prompt_file=None)
    assert resolve_prompt(args) == DEFAULT_PROMPT
    (tmp_path / "prompt.txt").write_text("from prompt.txt")
    assert resolve_prompt(args) == "from prompt.txt"
    (tmp_path / "other.txt").write_text("from other")
    assert resolve_prompt(argparse.Namespace(prompt=None, prompt_file="other.txt")) == "from other"
    assert resolve_prompt(argparse.Namespace(prompt="given", prompt_file=None)) == "given"
    with pytest.raises(UserInputError, match="cannot read prompt file"):
        resolve_prompt(argparse.Namespace(prompt=None, prompt_file="missing.txt"))
    with pytest.raises(UserInputError, match="prompt is empty"):
        resolve_prompt(argparse.Namespace(prompt="  \n", prompt_file=None))


def test_sliding_window_layers_mask_like_the_model():
    """Mistral with a window shorter than the sequence: the fast path hides the same keys."""
    from sparse_viz.analysis.masking.final_position import masked_final_position_updates
    from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
    from sparse_viz.analysis.masking.reference import reference_final_position_updates

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SMALL, head_dim=8, sliding_window=4, initializer_range=0.3,
                                             attn_implementation="eager")).eval()
    adapter = ArchitectureAdapter.for_model(model)
    assert adapter.sliding_window(0) == 4
    input_ids = torch.randint(0, 64, (1, 9))
    inputs, _ = capture_layer_inputs(adapter, input_ids)
    fast = masked_final_position_updates(adapter, 0, inputs[0], range(9))
    # Row 0 (nothing masked) is what the model itself computed: the next layer's input.
    torch.testing.assert_close(inputs[0].hidden[0, -1] + fast.full[0], inputs[1].hidden[0, -1], rtol=1e-5, atol=1e-5)
    slow = reference_final_position_updates(adapter, 0, inputs[0], range(9))
    torch.testing.assert_close(fast.full, slow.full, rtol=1e-5, atol=1e-5)
    # Keys outside the window (positions 0-4 for the query at 8) change nothing when masked.
    assert torch.equal(fast.full[1:6], fast.full[:1].expand(5, -1))
