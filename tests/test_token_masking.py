"""Token masking: the fast path against brute-force masked forwards of the whole HF model.

The oracle here (`oracle_updates`) runs the complete model once per (layer, masked key), with
the model's own mask everywhere except layer L, whose additive 4D mask also hides key j from
the final query (REFERENCE §2: eager adds the mask as-is). Hooks read layer L's input and
output, the attention output after o_proj and o_proj's input. Nothing from token_masking.py
is used to build it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama, tiny_qwen3

from sparse_viz.analysis.masking.experiment import run_masking_experiment
from sparse_viz.analysis.masking.final_position import masked_final_position_updates
from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
from sparse_viz.analysis.masking.outputs import write_masking_outputs
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.loading import LoadedModel, load_model
from sparse_viz.report.masking import RESULT_COLUMNS

PROMPT = "Masks, tea."


def as_loaded(model, tokenizer, name="tiny") -> LoadedModel:
    return LoadedModel(model, tokenizer, ArchitectureAdapter.for_model(model), torch.device("cpu"), torch.float32, name)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request) -> LoadedModel:
    model, tokenizer = (tiny_qwen3 if request.param == "qwen3" else tiny_llama)()
    return as_loaded(model, tokenizer, request.param)


# -- the independent oracle ------------------------------------------------------------------


def oracle_mask(n_tokens: int, masked_key: int | None) -> torch.Tensor:
    """(1, 1, T, T) additive causal mask; the final query also loses `masked_key`."""
    mask = torch.full((n_tokens, n_tokens), float("-inf")).triu(1)
    if masked_key is not None:
        mask[-1, masked_key] = float("-inf")
    return mask[None, None]


@torch.no_grad()
def oracle_updates(model, input_ids: torch.Tensor, layer: int, masked_key: int | None) -> dict[str, torch.Tensor]:
    """Full / Attn / per-head updates at the final position, by a whole-model masked forward."""
    decoder_layer = model.model.layers[layer]
    attention = decoder_layer.self_attn
    seen = {}

    def swap_mask(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"])[0, -1]
        return args, {**kwargs, "attention_mask": oracle_mask(input_ids.shape[1], masked_key)}

    hooks = [
        decoder_layer.register_forward_pre_hook(swap_mask, with_kwargs=True),
        decoder_layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0, -1])),
        attention.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0][0, -1])),
        attention.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0, -1])),
    ]
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    n_heads = model.config.num_attention_heads
    head_dim = model.config.head_dim
    w_o = attention.o_proj.weight
    heads = [w_o[:, h * head_dim : (h + 1) * head_dim] @ seen["z"][h * head_dim : (h + 1) * head_dim] for h in range(n_heads)]
    return {"Full": seen["out"] - seen["in"], "Attn": seen["attn"], **{f"Head_{h}": v for h, v in enumerate(heads)}}


def oracle_rows(model, tokenizer, input_ids: torch.Tensor, step: int = 0) -> pd.DataFrame:
    """Every layer x key x variant, distances in float64 with torch's cosine similarity."""
    rows = []
    n_tokens = input_ids.shape[1]
    for layer in range(model.config.num_hidden_layers):
        base = oracle_updates(model, input_ids, layer, None)
        for key in range(n_tokens):
            masked = oracle_updates(model, input_ids, layer, key)
            for variant, b in base.items():
                b, m = b.double(), masked[variant].double()
                rows.append(
                    {
                        "generation_step": step,
                        "layer": layer,
                        "token_masked": tokenizer.decode([int(input_ids[0, key])]),
                        "token_position": key,
                        "variant": variant,
                        "l2_distance": (b - m).norm().item(),
                        "cosine_distance": 1 - F.cosine_similarity(b, m, dim=0).item(),
                        "norm": b.norm().item(),
                    }
                )
    return pd.DataFrame(rows)


def assert_distances_match(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same rows in the same order; distances equal to fp32 accuracy.

    rtol 1e-5 on each distance, plus an absolute floor at the fp32 rounding level of the
    vectors being compared (a distance of 1e-7 between vectors of norm 10 is rounding noise).
    """
    key = ["generation_step", "layer", "token_position", "variant"]
    actual = actual.sort_values(key, kind="stable").reset_index(drop=True)
    expected = expected.sort_values(key, kind="stable").reset_index(drop=True)
    assert list(actual.columns) == list(RESULT_COLUMNS)
    pd.testing.assert_frame_equal(actual[key + ["token_masked"]], expected[key + ["token_masked"]], check_dtype=False)
    scale = expected["norm"].to_numpy()
    l2_error = np.abs(actual["l2_distance"].to_numpy() - expected["l2_distance"].to_numpy())
    assert np.all(l2_error <= 1e-5 * expected["l2_distance"].to_numpy() + 2e-6 * scale), l2_error.max()
    cos_error = np.abs(actual["cosine_distance"].to_numpy() - expected["cosine_distance"].to_numpy())
    assert np.all(cos_error <= 1e-5 * expected["cosine_distance"].to_numpy() + 1e-6), cos_error.max()


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_every_layer_token_and_variant_matches_masked_forward(tiny, method):
    results = run_masking_experiment(PROMPT, model=tiny, method=method)
    input_ids = tiny.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = oracle_rows(tiny.model, tiny.tokenizer, input_ids)
    adapter = tiny.adapter
    assert len(results) == adapter.n_layers * input_ids.shape[1] * (2 + adapter.n_heads)
    assert_distances_match(results, expected)


def test_masked_update_vectors_match_masked_forward(tiny):
    input_ids = tiny.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_tokens = input_ids.shape[1]
    inputs, _ = capture_layer_inputs(tiny.adapter, input_ids)
    for layer in range(tiny.adapter.n_layers):
        updates = masked_final_position_updates(tiny.adapter, layer, inputs[layer], range(n_tokens))
        for row, key in enumerate([None, *range(n_tokens)]):
            expected = oracle_updates(tiny.model, input_ids, layer, key)
            scale = expected["Full"].abs().max()
            torch.testing.assert_close(updates.full[row], expected["Full"], rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(updates.attn[row], expected["Attn"], rtol=1e-5, atol=1e-6 * scale)
            for h in range(tiny.adapter.n_heads):
                torch.testing.assert_close(updates.heads[row, h], expected[f"Head_{h}"], rtol=1e-5, atol=1e-6 * scale)


def test_identity_mask_through_the_masked_path_gives_exactly_zero(tiny):
    input_ids = tiny.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_tokens = input_ids.shape[1]
    inputs, _ = capture_layer_inputs(tiny.adapter, input_ids)
    from sparse_viz.analysis.masking.final_position import update_distances

    for layer in range(tiny.adapter.n_layers):
        updates = masked_final_position_updates(tiny.adapter, layer, inputs[layer], range(n_tokens), mask_value=0.0)
        l2, cosine = update_distances(updates)
        assert np.all(l2 == 0.0) and np.all(cosine == 0.0)


def test_a_key_holding_almost_all_attention_mass_is_masked_exactly():
    """The attention-sink case: p_j -> 1, where (o - p_j v_j) / (1 - p_j) would cancel."""
    model, tokenizer = tiny_llama(attention_bias=False)
    with torch.no_grad():  # sharpen layer 0's attention until one key takes ~all the mass
        model.model.layers[0].self_attn.q_proj.weight.mul_(40.0)
    loaded = as_loaded(model, tokenizer)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_tokens = input_ids.shape[1]

    captured = {}
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: captured.__setitem__("p", out[1]))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    hook.remove()
    assert captured["p"][0, :, -1].max() > 1 - 1e-4  # the case under test really occurs

    inputs, _ = capture_layer_inputs(loaded.adapter, input_ids, [0])
    updates = masked_final_position_updates(loaded.adapter, 0, inputs[0], range(n_tokens))
    for row, key in enumerate(range(n_tokens), start=1):
        expected = oracle_updates(model, input_ids, 0, key)
        scale = expected["Attn"].abs().max()
        torch.testing.assert_close(updates.attn[row], expected["Attn"], rtol=1e-5, atol=1e-6 * scale)


# -- decomposition -------------------------------------------------------------------------------


def test_heads_sum_to_attn_minus_bias_and_full_is_attn_plus_mlp(tiny):
    input_ids = tiny.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_tokens = input_ids.shape[1]
    inputs, _ = capture_layer_inputs(tiny.adapter, input_ids)
    for layer in range(tiny.adapter.n_layers):
        decoder_layer = tiny.model.model.layers[layer]
        updates = masked_final_position_updates(tiny.adapter, layer, inputs[layer], range(n_tokens))
        bias = decoder_layer.self_attn.o_proj.bias
        attn_without_bias = updates.attn - (bias if bias is not None else 0.0)
        torch.testing.assert_close(updates.heads.sum(dim=1), attn_without_bias, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            mid = inputs[layer].hidden[0, -1] + updates.attn  # (1+P, D)
            mlp_part = decoder_layer.mlp(decoder_layer.post_attention_layernorm(mid))
        torch.testing.assert_close(updates.full, updates.attn + mlp_part, rtol=1e-5, atol=1e-5)
    if tiny.name_or_path == "llama":
        assert bias is not None  # the bias case is exercised


# -- generation steps ----------------------------------------------------------------------------


def test_each_step_analyses_the_greedy_generate_sequence(tiny):
    num_tokens = 3
    results = run_masking_experiment(PROMPT, model=tiny, num_tokens=num_tokens)
    metadata = results.attrs["metadata"]
    input_ids = tiny.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_prompt = input_ids.shape[1]
    generated = tiny.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=num_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tiny.tokenizer.pad_token_id,
    )[0].tolist()
    n_rows_per_position = tiny.adapter.n_layers * (2 + tiny.adapter.n_heads)
    assert metadata["num_steps"] == num_tokens
    for step, entry in enumerate(metadata["steps"]):
        assert entry["generation_step"] == step
        assert entry["token_ids"] == generated[: n_prompt + step]
        assert entry["next_token_id"] == generated[n_prompt + step]
        at_step = results[results["generation_step"] == step]
        assert len(at_step) == (n_prompt + step) * n_rows_per_position
        assert sorted(at_step["token_position"].unique()) == list(range(n_prompt + step))
    assert metadata["generated_text"] == tiny.tokenizer.decode(generated[n_prompt:])


def test_last_step_sequence_matches_masked_forward(tiny):
    """Parity also holds on a step > 0 (prompt + generated tokens)."""
    results = run_masking_experiment(PROMPT, model=tiny, num_tokens=2, layers=[0])
    step1 = results[results["generation_step"] == 1]
    ids = torch.tensor([results.attrs["metadata"]["steps"][1]["token_ids"]])
    expected = oracle_rows(tiny.model, tiny.tokenizer, ids, step=1)
    assert_distances_match(step1, expected[expected["layer"] == 0])


def test_generation_stops_after_eos():
    model, tokenizer = tiny_qwen3()
    loaded = as_loaded(model, tokenizer)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # the first greedy token is now EOS
    results = run_masking_experiment(PROMPT, model=loaded, num_tokens=4)
    metadata = results.attrs["metadata"]
    assert metadata["num_steps"] == 1 and metadata["stopped_at_eos"]
    assert set(results["generation_step"]) == {0}


# -- options -------------------------------------------------------------------------------------


def test_layers_positions_and_exclude_first_token_select_rows(tiny):
    results = run_masking_experiment(PROMPT, model=tiny, layers="0,2-2" if tiny.adapter.n_layers > 2 else "0-1",
                                     positions="0-3,6", exclude_first_token=True)
    expected_layers = [0, 2] if tiny.adapter.n_layers > 2 else [0, 1]
    assert sorted(results["layer"].unique()) == expected_layers
    assert sorted(results["token_position"].unique()) == [1, 2, 3, 6]
    assert len(results) == len(expected_layers) * 4 * (2 + tiny.adapter.n_heads)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"layers": "0,9"}, "layers"),
        ({"layers": "1-x"}, "layers"),
        ({"positions": "99"}, "positions"),
        ({"method": "magic"}, "method"),
        ({"positions": "0", "exclude_first_token": True}, "no key positions"),
    ],
)
def test_bad_options_raise_one_clear_error(tiny, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        run_masking_experiment(PROMPT, model=tiny, **kwargs)


def test_prompt_longer_than_the_context_is_refused(tiny):
    with pytest.raises(UserInputError, match="context"):
        run_masking_experiment("x" * 100, model=tiny)  # tiny context: 64 positions


def test_chat_template_wraps_the_prompt(tiny):
    results = run_masking_experiment(PROMPT, model=tiny, chat=True, layers=[0])
    tokens = results.attrs["metadata"]["prompt_tokens"]
    assert "".join(tokens) == tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )


# -- outputs -------------------------------------------------------------------------------------


def test_outputs_hold_the_same_rows_in_csv_and_json(tiny_model_dirs, tmp_path):
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    results = run_masking_experiment("<b>&'\"", model=loaded, num_tokens=2)
    output = write_masking_outputs(tmp_path / "out", results, results.attrs["metadata"], report=False)
    from_csv = pd.read_csv(output / "masking_results.csv", keep_default_na=False)
    payload = json.loads((output / "masking_results.json").read_text(encoding="utf-8"))
    from_json = pd.DataFrame(payload["columns"])
    assert payload["num_rows"] == len(results)
    for frame in (from_csv, from_json):
        assert list(frame.columns) == list(RESULT_COLUMNS)
        pd.testing.assert_frame_equal(frame, results, check_dtype=False, rtol=1e-12)
    metadata = json.loads((output / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["prompt"] == "<b>&'\""
    assert set(metadata["variant_definitions"]) == {"Full", "Attn", "Head_N"}
    assert metadata["timings"]["total_seconds"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_write_leaves_an_existing_output_untouched(tiny, tmp_path, monkeypatch):
    results = run_masking_experiment(PROMPT, model=tiny, layers=[0])
    output = tmp_path / "out"
    write_masking_outputs(output, results, results.attrs["metadata"], report=False)
    earlier = {p.name: p.read_bytes() for p in output.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(RuntimeError):
        write_masking_outputs(output, results, results.attrs["metadata"], report=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
