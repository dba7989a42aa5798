"""Sparse inference with caches equals the masked reference.

The reference is `selected_attention.py`: the model's full eager attention with the selection as
an additive mask, recomputed over the whole sequence (no cache). Sparse inference must give the
same logits in a prefill, select in each decode step exactly the last row of a prefill one token
longer, and so generate the same tokens, for every selector it supports, on GQA models.
"""

from __future__ import annotations

import pytest
import torch
from analysis_cli import run_analysis_cli
from tiny_models import tiny_llama, tiny_qwen3

from sparse_viz.errors import UserInputError
from sparse_viz.model.config import ModelConfig
from sparse_viz.model.indexer import LightningIndexer
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.selected_attention import KeySelection, selection_installed
from sparse_viz.pretrained.sparse_inference import install_sparse_inference

PROMPT = "The cat sat on the mat, and the dog sat on the log while the bird sang."


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request):
    model, tokenizer = (tiny_qwen3 if request.param == "qwen3" else tiny_llama)()  # GQA 4/2
    return model.eval(), tokenizer


def indexers_for(model, seed=0):
    adapter = ArchitectureAdapter.for_model(model)
    config = ModelConfig(d_model=adapter.hidden_size, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    torch.manual_seed(seed)
    return torch.nn.ModuleList(LightningIndexer(config) for _ in range(adapter.n_layers))


def selection_for(model, selector: str, k: int, dense_layers: int = 0) -> KeySelection:
    return KeySelection(selector, top_k=k, sink_tokens=2, dense_layers=dense_layers, indexer_rope_dim=4,
                        indexers=indexers_for(model) if selector == "topk" else None)


def masked_reference_logits(model, input_ids, selection) -> torch.Tensor:
    with selection_installed(model, selection):
        return model(input_ids=input_ids, use_cache=False).logits


CASES = [("dense", 4, 0), ("local", 4, 0), ("sink_local", 5, 0), ("oracle", 3, 0), ("topk", 4, 0), ("topk", 4, 1)]


@torch.no_grad()
@pytest.mark.parametrize("selector, k, dense_layers", CASES)
def test_sparse_prefill_equals_the_masked_reference(tiny, selector, k, dense_layers):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    selection = selection_for(model, selector, k, dense_layers)
    want = masked_reference_logits(model, ids, selection)
    state = install_sparse_inference(model, selection)
    try:
        got = model(input_ids=ids, use_cache=False).logits
    finally:
        state.uninstall()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if selector != "dense":
        assert not torch.allclose(got, model(input_ids=ids).logits, atol=1e-3)  # the selection does something


@torch.no_grad()
@pytest.mark.parametrize("selector, k, dense_layers", CASES)
def test_each_decode_step_equals_the_last_row_of_a_longer_prefill(tiny, selector, k, dense_layers):
    """Prefill 3 tokens, then decode the rest one by one through the KV cache: step t's logits and
    selection are those of row t of a prefill of t + 1 tokens (selection from the reference)."""
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    T = ids.shape[1]
    selection = selection_for(model, selector, k, dense_layers)
    state = install_sparse_inference(model, selection)
    try:
        out = model(input_ids=ids[:, :3], use_cache=True)
        cache, steps = out.past_key_values, []
        for t in range(3, T):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append((t, out.logits[:, -1], {layer: sel[:, -1].clone() for layer, sel in state.last_selected.items()}))
    finally:
        state.uninstall()
    for t, logits, selected in steps:
        prefix = ids[:, :t + 1]
        with selection_installed(model, selection):
            want = model(input_ids=prefix, use_cache=False).logits[:, -1]
            reference_rows = {layer: sel[:, -1] for layer, sel in selection.last_selected.items()}
        # float32 logits of size ~1 summed in another order (k cached rows vs a masked full row,
        # SDPA over the cache in dense layers): 1.3e-5 seen, 3e-5 allowed
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=3e-5)
        for layer, row in reference_rows.items():
            assert set(row[row >= 0].tolist()) == set(selected[layer][selected[layer] >= 0].tolist()), (t, layer)


def greedy_both_ways(model, ids, selection, max_new_tokens: int, **generate_kwargs) -> tuple[list, list]:
    """Greedy tokens through the masked reference (no cache) and through sparse inference's caches."""
    with selection_installed(model, selection):
        want = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=False)
    state = install_sparse_inference(model, selection)
    try:
        got = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    finally:
        state.uninstall()
    return want.tolist(), got.tolist()


@torch.no_grad()
@pytest.mark.parametrize("selector, k", [("topk", 4), ("sink_local", 5), ("oracle", 3)])
def test_greedy_generate_through_the_caches_emits_the_reference_tokens(tiny, selector, k):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    want, got = greedy_both_ways(model, ids, selection_for(model, selector, k), 12)
    assert got == want
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert dense.tolist() != want or selector == "oracle"  # random weights: sparse changes the text


@torch.no_grad()
def test_a_left_padded_batch_generates_what_each_sequence_generates_alone(tiny):
    model, tokenizer = tiny
    prompts = [PROMPT, "A short one."]
    selection = selection_for(model, "topk", 4)
    state = install_sparse_inference(model, selection)
    try:
        alone = [model.generate(tokenizer(p, return_tensors="pt")["input_ids"], max_new_tokens=8, do_sample=False)
                 for p in prompts]
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)
    finally:
        state.uninstall()
    for row, single in zip(together, alone):
        assert row[-8:].tolist() == single[0, -8:].tolist()


@torch.no_grad()
def test_sampling_runs_through_the_caches_and_is_reproducible_by_seed(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    state = install_sparse_inference(model, selection_for(model, "topk", 4))
    try:
        draws = []
        for _ in range(2):
            torch.manual_seed(7)
            draws.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0).tolist())
    finally:
        state.uninstall()
    assert draws[0] == draws[1] and len(draws[0][0]) == ids.shape[1] + 6


@torch.no_grad()
def test_the_indexer_key_cache_equals_the_keys_recomputed_from_the_whole_sequence(tiny):
    from sparse_viz.model.rope import rope_tables

    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    T = ids.shape[1]
    selection = selection_for(model, "topk", 4)
    state = install_sparse_inference(model, selection)
    captured = {}
    adapter = ArchitectureAdapter.for_model(model)
    hooks = [adapter.attention(i).register_forward_pre_hook(
        lambda m, a, kw, i=i: captured.__setitem__(i, kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True) for i in range(adapter.n_layers)]
    try:
        model.generate(ids, max_new_tokens=1, do_sample=False)  # a prefill, to capture the whole inputs
        full = {i: captured[i] for i in captured}
        cache = model(input_ids=ids[:, :5], use_cache=True).past_key_values
        for t in range(5, T):
            cache = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
        cached = {layer: cache.keys() for layer, cache in state.indexer_keys.items()}
        state.uninstall()
    cos, sin = rope_tables(4, T, selection.indexer_rope_theta)
    for layer, keys in cached.items():
        _, want, _ = selection.indexers[layer].project(full[layer][:, :T], cos, sin)
        torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(selector="random", top_k=4), "cannot decode with caches"),
    (dict(selector="topk", top_k=4), "needs trained indexers"),
    (dict(selector="local", top_k=0), "k must be >= 1"),
])
def test_bad_settings_are_one_clear_error(tiny, kwargs, message):
    model, _ = tiny
    with pytest.raises(UserInputError, match=message):
        install_sparse_inference(model, KeySelection(**kwargs))


def test_indexers_for_another_number_of_layers_are_refused(tiny):
    model, _ = tiny
    selection = KeySelection("topk", top_k=4, indexers=indexers_for(model)[:1], indexer_rope_dim=4)
    with pytest.raises(UserInputError, match="indexers for a model with"):
        install_sparse_inference(model, selection)


# -- the command ----------------------------------------------------------------------------------

SHORT = "The cat sat on the mat."  # 23 tokens of the tiny models' character tokenizer (context 64)


def test_generate_prints_the_text_of_the_masked_reference_and_both_speeds(tiny_model_dirs, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_model_dirs["llama"]
    result = run_analysis_cli(["generate", "--model", str(directory), "--selector", "sink_local", "--k", "5",
                               "--prompt", SHORT, "--max-new-tokens", "8", "--device", "cpu"], capsys)
    assert result.returncode == 0, result.stderr
    speeds = [line for line in result.stderr.splitlines() if line.startswith("attention:")]
    assert len(speeds) == 1 and "sink_local k=5" in speeds[0] and "prefill" in speeds[0] and "decode 7 tokens" in speeds[0]

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(SHORT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), selection_installed(model, KeySelection("sink_local", top_k=5, sink_tokens=4)):
        want = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)[0, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    want = want[: (want == eos).nonzero()[0, 0] + 1] if (want == eos).any() else want  # the command stops at eos
    assert result.stdout.rstrip("\n") == tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("extra, message", [
    (["--selector", "topk"], "--selector topk needs trained indexers"),
    (["--selector", "local", "--k", "0"], "--k must be >= 1"),
    (["--selector", "random"], "--selector must be one of"),
    (["--selector", "local", "--max-new-tokens", "60"], "exceed the model's context of 64"),
    (["--selector", "local", "--prompt", PROMPT], "longer than the model's context of 64"),
])
def test_generate_bad_input_is_one_line_exit_2(tiny_model_dirs, capsys, extra, message):
    result = run_analysis_cli(["generate", "--model", str(tiny_model_dirs["llama"]), "--prompt", SHORT,
                               "--device", "cpu", *extra], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@torch.no_grad()
@pytest.mark.parametrize("selector, k", [("topk", 4), ("local", 4)])
def test_a_static_cache_decodes_as_the_reference_too(tiny, selector, k):
    """A preallocated cache hands the attention every row, filled or not; the mask says which are
    filled, and only those are selected from."""
    model, tokenizer = tiny
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    want, got = greedy_both_ways(model, ids, selection_for(model, selector, k), 8, cache_implementation="static")
    assert got == want
