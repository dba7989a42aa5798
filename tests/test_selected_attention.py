"""Selection-restricted attention inside an unmodified Hugging Face model, against brute force:
the model run layer by layer, each layer called with an explicit additive mask built from its
selection."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen3

from sparse_viz.errors import UserInputError
from sparse_viz.model.config import ModelConfig
from sparse_viz.model.indexer import LightningIndexer
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import select_keys
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.selected_attention import KeySelection, selection_installed

PROMPT = "The cat sat on the mat, and the dog sat on the log."


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tiny(request):
    model, tokenizer = (tiny_qwen3 if request.param == "qwen3" else tiny_llama)()  # GQA 4/2
    return model, tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def indexers_for(model, seed=0):
    adapter = ArchitectureAdapter.for_model(model)
    config = ModelConfig(d_model=adapter.hidden_size, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    torch.manual_seed(seed)
    return torch.nn.ModuleList(LightningIndexer(config) for _ in range(adapter.n_layers))


def brute_force_logits(model, input_ids, selection: KeySelection):
    """Layer by layer: each layer's selection from first principles, then an additive (1, 1, T, T)
    mask that is causal AND the selection, passed to the layer as its attention mask."""
    adapter = ArchitectureAdapter.for_model(model)
    T = input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    positions = torch.arange(T)[None]
    h = adapter.embed_tokens(input_ids)
    pe = adapter.rotary_emb(h, positions)
    for i, layer in enumerate(adapter.layers):
        normed = adapter.input_norm(i)(h)
        captured = {}
        hook = adapter.attention(i).register_forward_hook(lambda m, a, out: captured.__setitem__("p", out[1]))
        causal_mask = torch.zeros(1, 1, T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
        layer(h, attention_mask=causal_mask, position_embeddings=pe, position_ids=positions)  # dense probabilities
        hook.remove()
        if selection.is_dense(i):
            keep = causal
        else:
            scores = None
            if selection.selector == "topk":
                cos, sin = rope_tables(selection.indexer_rope_dim, T, selection.indexer_rope_theta)
                scores, _ = selection.indexers[i](normed, cos, sin)
            selected = select_keys(selection.selector, top_k=selection.top_k, seq_len=T, index_scores=scores,
                                   dense_probs=captured["p"], sink_tokens=selection.sink_tokens, seed=selection.seed)
            keep = torch.zeros(T, T, dtype=torch.bool)
            for t in range(T):
                for s in selected[0, t].tolist():
                    if s >= 0:
                        keep[t, s] = True
        assert not (keep & ~causal).any()  # never a future key
        mask = torch.zeros(1, 1, T, T).masked_fill(~keep, torch.finfo(torch.float32).min)
        h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=positions)
    return adapter.lm_head(adapter.final_norm(h))


@torch.no_grad()
def test_dense_selection_reproduces_the_models_logits(tiny):
    model, input_ids = tiny
    expected = model(input_ids=input_ids).logits
    with selection_installed(model, KeySelection("dense")):
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)  # uninstalled


@torch.no_grad()
@pytest.mark.parametrize("selector, k, dense_layers", [
    ("local", 4, 0), ("sink_local", 5, 0), ("random", 4, 0), ("oracle", 3, 0), ("topk", 4, 0), ("topk", 4, 1),
])
def test_each_selector_equals_a_brute_force_forward_with_its_per_layer_mask(tiny, selector, k, dense_layers):
    model, input_ids = tiny
    selection = KeySelection(selector, top_k=k, sink_tokens=2, seed=3, dense_layers=dense_layers,
                             indexers=indexers_for(model) if selector == "topk" else None, indexer_rope_dim=4)
    expected = brute_force_logits(model, input_ids, selection)
    with selection_installed(model, selection):
        got = model(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(input_ids=input_ids).logits, atol=1e-3)  # the selection does something


@torch.no_grad()
def test_all_heads_of_a_layer_attend_to_the_same_keys_and_never_the_future(tiny):
    model, input_ids = tiny
    T = input_ids.shape[1]
    weights = {}
    adapter = ArchitectureAdapter.for_model(model)
    hooks = [adapter.attention(i).register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
             for i in range(adapter.n_layers)]
    with selection_installed(model, KeySelection("oracle", top_k=3)):
        model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    for i, w in weights.items():
        support = w[0] > 0  # (H, T, T)
        assert (support == support[0]).all(), f"layer {i}: heads attend to different keys"
        assert not support[0].triu(1).any()
        assert (support[0].sum(-1) == torch.arange(1, T + 1).clamp(max=3)).all()  # k keys, short rows dense


@pytest.mark.parametrize("kwargs, message", [
    (dict(selector="topk"), "needs trained indexers"),
    (dict(selector="local", top_k=0), "k must be >= 1"),
    (dict(selector="sink_local", top_k=4, sink_tokens=4), "sink_tokens < k"),
    (dict(selector="nearest"), "unknown selector"),
])
def test_bad_selections_are_one_clear_error(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        KeySelection(**kwargs)
