"""The non-CPU paths of DSA on CUDA (plain gathered copies instead of the CPU's CSR kernels):
equal to the readable references (skipped without a GPU; run by bench/device_checks.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.attention import (
    gather_selected,
    gathered_sparse_attention,
    masked_sparse_attention,
)
from sparse_viz.model.indexer import LightningIndexer, indexer_kl
from sparse_viz.model.indexer_blocks import (
    blockwise_causal_kl,
    blockwise_topk,
    selected_index_scores,
)
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import select_keys, topk_causal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 products on the GPU (no TF32), so that 1e-5 comparisons mean something."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped, one shared key/value head
def test_gathered_attention_on_cuda_equals_the_masked_reference_on_cpu(kv_heads):
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 4, 300, 16
    q = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, hd, generator=g, requires_grad=True) for _ in range(2))
    selected = select_keys("topk", top_k=32, seq_len=T, index_scores=torch.randn(B, T, T, generator=g))
    grad = torch.randn(B, H, T, hd, generator=g)
    want = masked_sparse_attention(q, k, v, selected)[0]
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    q_gpu, k_gpu, v_gpu = (x.detach().cuda().requires_grad_() for x in (q, k, v))
    got = gathered_sparse_attention(q_gpu, k_gpu, v_gpu, selected.cuda(), chunk_size=64)[0]  # auto = copy off CPU
    got_grads = torch.autograd.grad(got, (q_gpu, k_gpu, v_gpu), grad.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_blockwise_indexer_on_cuda_equals_the_full_path():
    """Selection == topk of the full matrix on the same device (same topk, same ties); the
    selected-key scores (copy kernel), both KL losses and their gradients == the CPU reference."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=24, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    indexer = LightningIndexer(config)
    gpu = copy.deepcopy(indexer).cuda()
    T = 200
    x = torch.randn(2, T, 24)
    cos, sin = rope_tables(4, T, 10000.0)
    full, _ = indexer(x, cos, sin)
    full_gpu, _ = gpu(x.cuda(), cos.cuda(), sin.cuda())
    q, k, w = gpu.project(x.cuda(), cos.cuda(), sin.cuda())
    for block_size in (7, 64, 512):
        assert torch.equal(blockwise_topk(q, k, w, 16, block_size), topk_causal(full_gpu, 16))

    selected = topk_causal(full, 16)
    target = torch.rand(2, T, 16) * (selected >= 0)
    reference = indexer_kl(target, gather_selected(full, selected), selected >= 0).mean()
    got = indexer_kl(target.cuda(), selected_index_scores(q, k, w, selected.cuda(), chunk_size=50),
                     selected.cuda() >= 0).mean()
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, list(gpu.parameters())), torch.autograd.grad(reference, list(indexer.parameters()))):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)

    q_main, k_main = torch.randn(2, 2, T, 6), torch.randn(2, 2, T, 6)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax((q_main @ k_main.transpose(-1, -2) / 6**0.5).masked_fill(~causal, float("-inf")), -1)
    warm_reference = indexer_kl(probs.sum(1), full, causal).mean()
    q, k, w = gpu.project(x.cuda(), cos.cuda(), sin.cuda())
    warm = blockwise_causal_kl(q, k, w, q_main.cuda(), k_main.cuda(), block_size=48).mean()
    torch.testing.assert_close(warm.cpu(), warm_reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,indexer_loss", [("sparse", "selected"), ("dense", "all")])
def test_model_step_on_cuda_blockwise_equals_full_path(attention, indexer_loss):
    """One training step on CUDA: the blockwise indexer path == the full-matrix path (same device)."""
    fields = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=600, top_k=24,
                  indexer_heads=3, indexer_dim=8, indexer_rope_dim=4, indexer_block_size=100)
    torch.manual_seed(0)
    full = SparseTransformer(ModelConfig(**fields, indexer_path="full")).cuda()
    blocks = SparseTransformer(ModelConfig(**fields, indexer_path="blockwise")).cuda()
    blocks.load_state_dict(full.state_dict())
    ids = torch.randint(0, 50, (2, 513), device="cuda")
    grads = []
    for model in (full, blocks):
        out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.indexer_kl.sum()
        model.zero_grad()
        loss.backward()
        grads.append((out, [p.grad for p in model.parameters()]))
    (out_full, g_full), (out_blocks, g_blocks) = grads
    torch.testing.assert_close(out_blocks.logits, out_full.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_blocks.indexer_kl, out_full.indexer_kl, rtol=1e-4, atol=1e-6)
    for a, b in zip(g_blocks, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_long_sequence_step_on_cuda_runs_and_reports_its_peak_memory(capsys):
    """T = 8192, k = 256, the benchmark's model: one blockwise sparse-stage step on CUDA is finite;
    its peak GPU memory is printed (the copy kernel saves its gathered (T, k, H*hd) keys and
    values for backward, O(T*k) but large: a number to read, not a claim)."""
    T = 8192
    config = ModelConfig(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, d_ff=768, max_seq_len=T, top_k=256,
                         indexer_heads=4, indexer_dim=32, indexer_rope_dim=16)
    model = SparseTransformer(config).cuda()
    ids = torch.randint(0, 2048, (1, T + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = model(ids[:, :-1], attention="sparse", indexer_loss="selected")
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.indexer_kl.sum()
    loss.backward()
    assert torch.isfinite(loss)
    with capsys.disabled():
        print(f"\nT={T} blockwise sparse-stage step on CUDA: peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
