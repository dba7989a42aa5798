"""Sparse attention paths against a naive loop and each other; the model's dense/sparse switch;
traces; configuration errors."""

import math

import pytest
import torch

from sparse_viz.model import AttentionTrace, ModelConfig, SparseTransformer, TransformerOutput, select_keys
from sparse_viz.model.attention import gathered_sparse_attention, masked_sparse_attention
from sparse_viz.model.config import SELECTORS


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=43, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=40, top_k=5,
        sink_tokens=2, indexer_heads=2, indexer_dim=8, indexer_rope_dim=4,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def naive_sparse_attention(q, k, v, selected):
    """Per (b, h, t): softmax over the selected keys only, by plain loops."""
    B, H, T, hd = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in selected[b, t].tolist() if s >= 0]
                logits = [float(q[b, h, t] @ k[b, h, s]) / math.sqrt(hd) for s in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                z = sum(weights)
                for w, s in zip(weights, keys):
                    out[b, h, t] += (w / z) * v[b, h, s]
    return out


@pytest.mark.parametrize("name", ["topk", "local", "sink_local", "random", "oracle"])
def test_masked_and_gathered_paths_equal_a_naive_loop(name):
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 3, 11, 4
    q, k, v = (torch.randn(B, H, T, hd, generator=g) for _ in range(3))
    selected = select_keys(name, top_k=4, seq_len=T, index_scores=torch.randn(B, T, T, generator=g),
                           dense_probs=torch.rand(B, H, T, T, generator=g), sink_tokens=1, batch_size=B)
    expected = naive_sparse_attention(q, k, v, selected)
    masked, masked_probs = masked_sparse_attention(q, k, v, selected, return_probs=True)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    copied, copied_probs = gathered_sparse_attention(q, k, v, selected, return_probs=True, chunk_size=3, kernel="copy")
    gathered, gathered_probs = gathered_sparse_attention(q, k, v, selected, return_probs=True, kernel="csr")
    torch.testing.assert_close(copied, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copied_probs, gathered_probs, rtol=1e-5, atol=1e-6)
    # The gathered probabilities, read in key space, are the masked path's.
    dense_from_gathered = torch.zeros(B, H, T, T)
    for b in range(B):
        for t in range(T):
            for j, s in enumerate(selected[b, t].tolist()):
                if s >= 0:
                    dense_from_gathered[b, :, t, s] = gathered_probs[b, :, t, j]
    torch.testing.assert_close(dense_from_gathered, masked_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["csr", "copy"])
def test_gradients_of_the_gathered_kernels_equal_the_masked_path(kernel):
    g = torch.Generator().manual_seed(4)
    B, H, T, hd = 2, 2, 10, 4
    q, k, v = (torch.randn(B, H, T, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    selected = select_keys("random", top_k=3, seq_len=T, batch_size=B, seed=1)
    weights = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
    reference = torch.autograd.grad((masked_sparse_attention(q, k, v, selected)[0] * weights).sum(), (q, k, v))
    fast = torch.autograd.grad((gathered_sparse_attention(q, k, v, selected, kernel=kernel)[0] * weights).sum(), (q, k, v))
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("selector", SELECTORS)
def test_gathered_model_equals_masked_model_for_every_selector(selector):
    ids = torch.randint(0, 43, (2, 23), generator=torch.Generator().manual_seed(1))
    outputs = []
    for path in ("masked", "gathered"):
        torch.manual_seed(0)
        model = SparseTransformer(tiny_config(selector=selector, attention_path=path))
        out = model(ids, indexer_loss="selected", trace="full")
        outputs.append(out)
    masked, gathered = outputs
    torch.testing.assert_close(gathered.logits, masked.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered.indexer_kl, masked.indexer_kl, rtol=1e-4, atol=1e-6)
    for a, b in zip(masked.traces, gathered.traces):
        torch.testing.assert_close(b.attn_probs, a.attn_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["copy", "csr", "fused"])
def test_every_kernel_with_grouped_key_value_heads_equals_the_naive_loop_on_repeated_heads(kernel):
    g = torch.Generator().manual_seed(6)
    B, H, T, hd = 2, 4, 11, 4
    q = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 2, T, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    selected = select_keys("topk", top_k=4, seq_len=T, index_scores=torch.randn(B, T, T, generator=g), batch_size=B)
    repeated_k, repeated_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # heads 0,1 -> 0; 2,3 -> 1
    expected = naive_sparse_attention(q.detach(), repeated_k.detach(), repeated_v.detach(), selected)
    out, _ = gathered_sparse_attention(q, k, v, selected, kernel=kernel, chunk_size=3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    masked, _ = masked_sparse_attention(q, repeated_k, repeated_v, selected)
    for grad, want in zip(grads, torch.autograd.grad((masked * weights).sum(), (q, k, v))):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", ["dense", "sparse"])
@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_grouped_query_model_equals_the_model_with_its_key_value_heads_repeated(path, attention):
    """n_kv_heads=2 of 4: the same logits, KL and gradients as a 4-head model whose key and value
    projections repeat each of the grouped model's heads for its two query heads."""
    ids = torch.randint(0, 43, (2, 23), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    grouped = SparseTransformer(tiny_config(n_kv_heads=2, attention_path=path))
    full = SparseTransformer(tiny_config(attention_path=path))
    state = grouped.state_dict()
    hd = grouped.config.head_dim
    for name, weight in list(state.items()):
        if name.endswith("attn.qkv.weight"):  # rows: q (4 heads), k (2 heads), v (2 heads)
            q_rows, k_rows, v_rows = weight.split((4 * hd, 2 * hd, 2 * hd))
            repeat = lambda rows: rows.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
            state[name] = torch.cat([q_rows, repeat(k_rows), repeat(v_rows)])
    full.load_state_dict(state)
    outputs = [model(ids, attention=attention, indexer_loss="selected" if attention == "sparse" else "all")
               for model in (grouped, full)]
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0].indexer_kl, outputs[1].indexer_kl, rtol=1e-4, atol=1e-6)
    for out in outputs:
        out.logits.square().mean().backward()
    mlp_grads = [dict(m.named_parameters())["blocks.0.mlp_norm.weight"].grad for m in (grouped, full)]
    torch.testing.assert_close(mlp_grads[0], mlp_grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["masked", "gathered"])
def test_topk_with_k_at_least_T_equals_dense_attention(path):
    torch.manual_seed(0)
    model = SparseTransformer(tiny_config(top_k=16, attention_path=path))
    ids = torch.randint(0, 43, (2, 16), generator=torch.Generator().manual_seed(2))
    sparse = model(ids, attention="sparse").logits
    dense = model(ids, attention="dense").logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # ...and with k < T the two differ (the selection really restricts attention).
    small = SparseTransformer(tiny_config(top_k=3, attention_path=path))
    small.load_state_dict(model.state_dict())
    assert (small(ids).logits - dense).abs().max() > 1e-4


def test_dense_fast_path_equals_the_explicit_softmax_path():
    """attention='dense' uses fused SDPA unless probabilities are needed; both give the same logits."""
    torch.manual_seed(0)
    model = SparseTransformer(tiny_config(use_indexer=False, selector="dense"))
    ids = torch.randint(0, 43, (2, 20), generator=torch.Generator().manual_seed(3))
    fast = model(ids, attention="dense").logits
    explicit = model(ids, attention="dense", trace="full").logits
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)


def test_traces_hold_what_was_asked_for_with_the_documented_shapes():
    torch.manual_seed(0)
    config = tiny_config(top_k=4)
    model = SparseTransformer(config)
    ids = torch.randint(0, 43, (2, 9))
    out = model(ids)
    assert isinstance(out, TransformerOutput) and out.traces is None and out.indexer_kl is None
    assert out.logits.shape == (2, 9, 43)

    select = model(ids, trace="select").traces
    assert len(select) == 2 and all(isinstance(t, AttentionTrace) for t in select)
    assert select[0].selected.shape == (2, 9, 4) and select[0].index_scores.shape == (2, 9, 9)
    assert select[0].attn_probs is None and select[0].dense_attn_probs is None and select[0].index_head_terms is None

    full = model(ids, trace="full").traces[1]
    assert full.index_head_terms.shape == (2, 2, 9, 9)
    assert full.attn_probs.shape == (2, 4, 9, 9) and full.dense_attn_probs.shape == (2, 4, 9, 9)
    torch.testing.assert_close(full.index_head_terms.sum(1), full.index_scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), 0.0))
    torch.testing.assert_close(full.attn_probs.sum(-1), torch.ones(2, 4, 9))
    # Used probabilities are zero off the selection.
    off = torch.ones(2, 9, 9, dtype=torch.bool)
    for b in range(2):
        for t in range(9):
            for s in full.selected[b, t].tolist():
                if s >= 0:
                    off[b, t, s] = False
    assert full.attn_probs.masked_select(off[:, None].expand_as(full.attn_probs)).abs().max() == 0.0

    dense = model(ids, attention="dense", trace="select").traces[0]
    assert dense.selected is None


def test_a_dense_model_without_indexer_traces_no_index_scores():
    model = SparseTransformer(tiny_config(use_indexer=False, selector="local"))
    trace = model(torch.randint(0, 43, (1, 8)), trace="full").traces[0]
    assert trace.index_scores is None and trace.index_head_terms is None
    assert model.indexer_parameters() == []


@pytest.mark.parametrize("overrides,message", [
    (dict(selector="bogus"), "unknown selector"),
    (dict(top_k=0), "top_k must be > 0"),
    (dict(top_k=-3), "top_k must be > 0"),
    (dict(attention_path="sideways"), "unknown attention_path"),
    (dict(selector="topk", use_indexer=False), "needs the Lightning Indexer"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must be > 0 and divide n_heads=4"),
    (dict(n_kv_heads=0), "n_kv_heads=0 must be > 0"),
])
def test_bad_config_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_forward_arguments_raise_a_clear_value_error():
    model = SparseTransformer(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention must be one of"):
        model(torch.zeros(1, 4, dtype=torch.long), attention="sparce")
    with pytest.raises(ValueError, match="indexer_loss must be one of"):
        model(torch.zeros(1, 4, dtype=torch.long), indexer_loss="some")
    no_indexer = SparseTransformer(tiny_config(max_seq_len=8, selector="local", use_indexer=False))
    with pytest.raises(ValueError, match="needs the Lightning Indexer"):
        no_indexer(torch.zeros(1, 4, dtype=torch.long), indexer_loss="all")


def test_csr_kernel_refuses_a_selection_out_of_order_and_auto_falls_back_to_copies():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    shuffled = torch.tensor([[[0, -1], [1, 0], [2, 1], [3, 1], [4, 0]]])  # row 1 is not ascending
    with pytest.raises(ValueError, match="ascending"):
        gathered_sparse_attention(q, k, v, shuffled, kernel="csr")
    out, _ = gathered_sparse_attention(q, k, v, shuffled, kernel="copy")
    torch.testing.assert_close(out, naive_sparse_attention(q, k, v, shuffled), rtol=1e-5, atol=1e-5)


def test_bfloat16_on_cpu_uses_the_csr_kernel_in_float32_and_matches_the_masked_path():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g).bfloat16() for _ in range(3))
    selected = select_keys("local", top_k=4, seq_len=12)
    out, probs = gathered_sparse_attention(q, k, v, selected, return_probs=True)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.bfloat16
    reference, _ = masked_sparse_attention(q.float(), k.float(), v.float(), selected)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)  # bf16 rounding of the output only


def test_the_sparse_stage_keeps_each_layers_selection_once_in_int32_for_backward():
    """With the fused kernels the attention and the indexer's loss of a layer read one int32 copy of
    its selection, and that copy is all of the selection their backward keeps (int64 would be twice)."""
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, indexer_heads=2, indexer_dim=8,
                         indexer_rope_dim=4, top_k=6, max_seq_len=24)
    torch.manual_seed(0)
    model = SparseTransformer(config)
    ids = torch.randint(0, 32, (2, 24))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids, attention="sparse", indexer_loss="selected")
    selections = {t.untyped_storage().data_ptr(): t for t in saved if t.shape == (2, 24, 6) and not t.is_floating_point()}
    assert len(selections) == config.n_layers
    assert all(t.dtype == torch.int32 for t in selections.values())
