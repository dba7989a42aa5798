"""The fused CPU kernels (`fused_kernels.py`, C++) against the readable references: sparse
attention == `masked_sparse_attention` (dense scores, -inf off the selection), the indexer's
selected-key scores == the full score matrix of `LightningIndexer.forward` read at the
selection, the top-k == `topk_causal` of that matrix; values and gradients, in float64 (to
round-off) and float32, over shapes that take every code path of the kernels (head sizes with
and without the vectorised tiles, head counts with and without a tile kernel, rows shorter and
longer than the prefilter's threshold, odd T, unfilled slots, ties).

CI builds the kernels (scripts/setup.sh installs g++ and ninja): a build failure fails here."""

import os
import subprocess
import sys

import pytest
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.attention import (
    gather_selected,
    gathered_sparse_attention,
    masked_sparse_attention,
    selection_mask,
)
from sparse_viz.model.fused_kernels import (
    fused_index_topk,
    fused_kernels_available,
    fused_kernels_disabled,
    fused_selected_attention,
    fused_selected_index_kl,
    fused_selected_index_scores,
    load_fused_kernels,
)
from sparse_viz.model.indexer import LightningIndexer, indexer_kl
from sparse_viz.model.indexer_blocks import selected_index_kl, selected_index_scores
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import select_keys, topk_causal


def test_the_kernels_are_built_on_this_machine():
    assert load_fused_kernels() is not None
    assert fused_kernels_available(torch.zeros(1))


def random_selection(B: int, T: int, K: int, generator: torch.Generator, unfilled: float = 0.2) -> torch.Tensor:
    """Causal selections in arbitrary order: row t holds up to K distinct keys <= t, some slots -1."""
    selected = torch.full((B, T, K), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            keys = torch.randperm(t + 1, generator=generator)[:K]
            keep = torch.rand(len(keys), generator=generator) >= unfilled
            keep[0] = True  # every row keeps a key (a row without one is tested on its own)
            keys = keys[keep]
            slots = torch.randperm(K, generator=generator)[: len(keys)]
            selected[b, t, slots] = keys
    return selected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 16, 12, 128])  # 12: no vectorised tile; 128: two blocks of 64
def test_attention_and_its_gradients_equal_the_masked_path(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    B, H, T, K = 2, 3, 37, 20  # rows of > 8 keys: the kernels' eight-row tiles and their remainders
    q, k, v = (torch.randn(B, H, T, head_dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    selected = random_selection(B, T, K, g)
    out, probs = fused_selected_attention(q, k, v, selected, per_head_probs=True)
    expected, expected_probs = masked_sparse_attention(q, k, v, selected, return_probs=True)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(probs, gather_selected(expected_probs, selected), **tol)
    _, summed = fused_selected_attention(q, k, v, selected, per_head_probs=False)
    torch.testing.assert_close(summed, gather_selected(expected_probs, selected).sum(1), **tol)
    weights = torch.randn(out.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 16, 12, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (8, 1), (6, 2)])  # groups of 2, 4, 8 (tiles) and 3
def test_grouped_query_attention_equals_the_masked_path_on_repeated_key_value_heads(dtype, head_dim, heads, kv_heads):
    """Query head h reads key/value head h // (H / HKV): the reference repeats each key/value head
    for its group (autograd sums the repeated heads' gradients) and attends head by head."""
    g = torch.Generator().manual_seed(heads * head_dim + kv_heads)
    B, T, K = 2, 37, 20
    group = heads // kv_heads
    q = torch.randn(B, heads, T, head_dim, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, head_dim, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    selected = random_selection(B, T, K, g)
    out, probs = fused_selected_attention(q, k, v, selected, per_head_probs=True)
    expected, expected_probs = masked_sparse_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), selected, return_probs=True
    )
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(probs, gather_selected(expected_probs, selected), **tol)
    weights = torch.randn(out.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    if dtype == torch.float32:  # a key's gradient sums group-times more float32 terms
        tol = dict(rtol=1e-5, atol=2e-6 * group)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **tol)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # the key pass; the scattered gradients of groups of 2 and 4
def test_attention_gradients_with_two_threads_equal_the_masked_path(kv_heads):
    """Threads split the queries: where the key/value gradients are scattered from each query, the
    second thread's terms go to its own copy, added at the end."""
    g = torch.Generator().manual_seed(11)
    B, H, T, D, K = 2, 4, 64, 16, 20  # 128 rows: more than one thread's share
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    selected = random_selection(B, T, K, g)
    weights = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    group = H // kv_heads
    expected, _ = masked_sparse_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), selected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, _ = fused_selected_attention(q, k, v, selected)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    finally:
        torch.set_num_threads(threads)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_key_value_heads_that_do_not_divide_the_query_heads_are_refused():
    q, k = torch.zeros(1, 4, 5, 8), torch.zeros(1, 3, 5, 8)
    selected = torch.zeros(1, 5, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="3 key/value heads do not divide 4 query heads"):
        gathered_sparse_attention(q, k, k, selected)
    with pytest.raises(RuntimeError, match="HKV dividing H"):
        fused_selected_attention(q, k, k, selected)


def test_attention_passes_torch_gradcheck():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    selected = random_selection(1, 9, 4, g)
    assert torch.autograd.gradcheck(lambda q, k, v: fused_selected_attention(q, k, v, selected)[0], (q, k, v))


def test_a_row_without_keys_gives_zero_output_and_no_gradient():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g, requires_grad=True) for _ in range(3))
    selected = random_selection(1, 6, 3, g)
    selected[0, 4] = -1  # row 4 selects nothing
    out, probs = fused_selected_attention(q, k, v, selected, per_head_probs=True)
    assert torch.equal(out[0, :, 4], torch.zeros(2, 16)) and torch.equal(probs[0, :, 4], torch.zeros(2, 3))
    out.sum().backward()
    assert torch.equal(q.grad[0, :, 4], torch.zeros(2, 16))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_float16_is_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 64, generator=g) for _ in range(3))
    selected = random_selection(1, 20, 6, g)
    out, _ = fused_selected_attention(q.half(), k.half(), v.half(), selected)
    assert out.dtype == torch.float16
    expected, _ = masked_sparse_attention(q.half().float(), k.half().float(), v.half().float(), selected)
    torch.testing.assert_close(out.float(), expected, rtol=1e-3, atol=1e-3)


def attention_gradients_from_the_stored_output(q, k, v, selected, out, grad_out):
    """Sparse attention's gradients in float64, written out: dS = P (dO V^T - delta), dQ = dS K / sqrt(d),
    dK = dS^T Q / sqrt(d), dV = P^T dO, each key/value head's summed over its query heads, with
    delta = dO . O from the output as stored (flash attention's backward reads the stored O, not
    the exact one). All inputs (B, heads, T, D); returns float64 (dQ, dK, dV)."""
    q, k, v, out, grad_out = (x.double() for x in (q, k, v, out, grad_out))
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5  # (B, H, T, T)
    scores = scores.masked_fill(~selection_mask(selected, T)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    dp = grad_out @ v.transpose(-1, -2)
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    grad_q = ds @ k * D**-0.5
    grad_k = (ds.transpose(-1, -2) @ q * D**-0.5).unflatten(1, (-1, G)).sum(2)
    grad_v = (probs.transpose(-1, -2) @ grad_out).unflatten(1, (-1, G)).sum(2)
    return grad_q, grad_k, grad_v


def assert_rounded_once_to_bfloat16(got: torch.Tensor, exact: torch.Tensor):
    """got (bfloat16) is exact (float64) rounded to the nearest bfloat16: within half a bfloat16 step
    of it (2^-8 of its magnitude), plus float32 round-off of the largest entry's size."""
    assert got.dtype == torch.bfloat16
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bfloat16's spacing at |exact|
    error = (got.double() - exact).abs()
    bound = 0.5 * step + 1e-5 * exact.abs().max()
    assert (error <= bound).all(), f"worst error {(error / step).max().item():.2f} steps"


@pytest.mark.parametrize("head_dim", [64, 12, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (6, 2)])  # key pass; scatter with tiles; without
def test_bfloat16_is_read_as_stored_computed_in_float32_and_rounded_once(head_dim, heads, kv_heads):
    """bfloat16 q, k, v (autocast's) go into the kernel as they are: scores, softmax and every sum in
    float32, the output and each gradient rounded once to bfloat16. Summing in bfloat16 would miss
    the half-step bound by far."""
    g = torch.Generator().manual_seed(heads * head_dim + kv_heads)
    B, T, K = 2, 37, 20
    q = torch.randn(B, heads, T, head_dim, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(B, kv_heads, T, head_dim, generator=g).bfloat16().requires_grad_() for _ in range(2))
    selected = random_selection(B, T, K, g)
    out, probs = fused_selected_attention(q, k, v, selected, per_head_probs=True)
    group = heads // kv_heads
    q64, k64, v64 = (x.detach().double() for x in (q, k, v))
    expected, expected_probs = masked_sparse_attention(
        q64, k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1), selected, return_probs=True
    )
    assert_rounded_once_to_bfloat16(out, expected)
    assert_rounded_once_to_bfloat16(probs, gather_selected(expected_probs, selected))
    grad_out = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = attention_gradients_from_the_stored_output(q64, k64, v64, selected, out.detach(), grad_out)
    for grad, want in zip(grads, expected_grads):
        assert_rounded_once_to_bfloat16(grad, want)


def test_bfloat16_attention_keeps_no_float32_copy_of_its_inputs_for_backward():
    """What backward needs is kept as given: q, k, v and the output in bfloat16 (half the memory of
    float32 copies), the log-sum-exp in float32 (one number per query and head)."""
    g = torch.Generator().manual_seed(4)
    B, H, T, D, K = 1, 4, 32, 16, 8
    q, k, v = (torch.randn(B, H, T, D, generator=g).bfloat16().requires_grad_() for _ in range(3))
    selected = random_selection(B, T, K, g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_selected_attention(q, k, v, selected)
    big = [t for t in saved if t.numel() == q.numel()]
    assert len(big) == 4 and all(t.dtype == torch.bfloat16 for t in big)  # q, k, v, out
    assert not any(t.dtype == torch.float32 and t.numel() > B * T * H for t in saved)


def test_the_gathered_paths_auto_kernel_is_the_fused_one_on_cpu():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 15, 16, generator=g) for _ in range(3))
    selected = random_selection(1, 15, 4, g)
    auto, auto_probs = gathered_sparse_attention(q, k, v, selected, return_probs=True, sum_heads=True)
    fused, fused_probs = fused_selected_attention(q, k, v, selected)
    assert torch.equal(auto, fused) and torch.equal(auto_probs, fused_probs)
    copied, copied_probs = gathered_sparse_attention(q, k, v, selected, return_probs=True, kernel="copy", sum_heads=True)
    torch.testing.assert_close(auto, copied, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto_probs, copied_probs, rtol=1e-5, atol=1e-6)


def random_indexer(T: int, heads: int, dim: int, batch: int = 2, seed: int = 0, dtype=torch.float64):
    """A random Lightning Indexer (d_model 24, RoPE on 4 dims), an input x (B, T, 24) and its RoPE tables."""
    torch.manual_seed(seed)
    config = ModelConfig(d_model=24, n_heads=2, indexer_heads=heads, indexer_dim=dim, indexer_rope_dim=4)
    indexer = LightningIndexer(config).to(dtype)
    x = torch.randn(batch, T, 24, dtype=dtype)
    return indexer, x, rope_tables(4, T, 10000.0)


def indexer_inputs(T: int, heads: int, dim: int, batch: int = 2, seed: int = 0, dtype=torch.float64):
    """A random Lightning Indexer's (q, k, w) and its full (B, T, T) score matrix, the reference."""
    indexer, x, (cos, sin) = random_indexer(T, heads, dim, batch, seed, dtype)
    with torch.no_grad():
        indexer.k_norm.weight.uniform_(0.5, 1.5)
    full, _ = indexer(x, cos, sin)  # (B, T, T); -inf on future keys
    return indexer.project(x, cos, sin), full


@pytest.mark.parametrize("heads,dim", [(4, 32), (1, 8), (2, 16), (8, 8), (3, 12)])  # (3, 12): no tile kernel
@pytest.mark.parametrize("T", [45, 301])  # 301: odd, and rows long enough (n >= 4k) for the prefilter's bound
def test_the_top_k_is_topk_causal_of_the_full_score_matrix(heads, dim, T):
    (q, k, w), full = indexer_inputs(T, heads, dim, seed=T + heads)
    for top_k in (1, 7, 16, T + 3):
        assert torch.equal(fused_index_topk(q, k, w, top_k), topk_causal(full, top_k))


def test_ties_at_the_kth_score_keep_the_earliest_keys():
    (q, k, w), _ = indexer_inputs(200, 4, 8, seed=7)
    # Every score exactly 0: each long row keeps its 16 earliest keys.
    all_tied = fused_index_topk(q, k, torch.zeros_like(w), 16)
    assert torch.equal(all_tied[:, 16:], torch.arange(16).expand(2, 184, 16))
    # Scores > 0 on every third key, exactly 0 elsewhere (every head product negative): rows with
    # fewer than 16 positive keys fill up with the earliest zeros.
    q, w = q.abs(), w.abs()
    keys = torch.where(torch.arange(200)[None, :, None] % 3 == 0, k.abs(), -k.abs())  # (B, T, d_I)
    scores = torch.einsum("bthd,bsd->bths", q, keys).relu().mul(w[..., None]).sum(2)  # (B, T, T)
    scores = scores.masked_fill(torch.ones(200, 200, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.equal(fused_index_topk(q, keys, w, 16), topk_causal(scores, 16))


@pytest.mark.parametrize("weights", ["positive", "negative", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_integer_scores_with_many_exact_ties_select_as_the_reference(dtype, weights):
    """Small integer queries, keys and weights: every score is an exact integer in float32 too, so
    ties at the k-th score (and at the prefilter's bound) are common and no rounding can excuse a
    difference from `topk_causal` of the same scores computed in float64. Negative head weights
    put the ties at negative scores too (whose bit patterns order the other way). bfloat16: q and
    k read as stored (the AVX512-BF16 tiles where the CPU has them), w in float32."""
    g = torch.Generator().manual_seed(11)
    B, T, heads, dim = 2, 300, 4, 8
    q = torch.randint(-2, 3, (B, T, heads, dim), generator=g).to(dtype)
    k = torch.randint(-2, 3, (B, T, dim), generator=g).to(dtype)
    w = torch.randint(1, 3, (B, T, heads), generator=g).to(dtype)
    if weights != "positive":
        w = -w if weights == "negative" else w * torch.randint(0, 2, w.shape, generator=g).mul(2).sub(1).to(dtype)
    scores = torch.einsum("bthd,bsd->bths", q.double(), k.double()).relu().mul(w.double()[..., None]).sum(2)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))  # (B, T, T)
    for top_k in (7, 16, 40):
        assert torch.equal(fused_index_topk(q, k, w, top_k), topk_causal(scores, top_k))


def test_the_top_k_in_float32_differs_from_the_reference_only_by_rounding():
    (q, k, w), full = indexer_inputs(300, 4, 32, seed=3, dtype=torch.float32)
    selected = fused_index_topk(q, k, w, 24)
    chosen = gather_selected(full, selected)[:, 24:]  # rows with more than k keys: every slot filled
    left_out = full.scatter(-1, selected.clamp(min=0), float("-inf"))[:, 24:]
    assert (left_out.max(-1).values <= chosen.min(-1).values + 1e-5).all()
    assert (selected != topk_causal(full, 24)).any(-1).float().mean() < 0.02  # swaps need near-equal scores


# (3, 12): no bfloat16 tile for 3 heads, (2, 7): an odd size: both widened to float32 first.
@pytest.mark.parametrize("heads,dim", [(4, 32), (1, 8), (2, 16), (8, 8), (3, 12), (2, 7)])
def test_the_top_k_of_bfloat16_q_and_k_ranks_their_exact_products(heads, dim):
    """bfloat16 q and k: each product is exact in float32 and only the float32 sums round, so the
    selection is the float64 reference's of the same bfloat16 values, up to near-equal scores."""
    (q, k, w), _ = indexer_inputs(301, heads, dim, seed=heads + dim, dtype=torch.float32)
    q, k = q.bfloat16(), k.bfloat16()
    scores = torch.einsum("bthd,bsd->bths", q.double(), k.double()).relu().mul(w.double()[..., None]).sum(2)
    scores = scores.masked_fill(torch.ones(301, 301, dtype=torch.bool).triu(1), float("-inf"))  # (B, T, T)
    selected = fused_index_topk(q, k, w, 24)
    chosen = gather_selected(scores, selected)[:, 24:]  # rows with more than k keys: every slot filled
    left_out = scores.scatter(-1, selected.clamp(min=0), float("-inf"))[:, 24:]
    tolerance = 1e-6 * scores[:, 24:].clamp(min=0).amax(-1)  # float32 sums of a few terms
    assert (left_out.max(-1).values <= chosen.min(-1).values + tolerance).all()
    assert (selected != topk_causal(scores, 24)).any(-1).float().mean() < 0.02  # swaps need near-equal scores


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,dim", [(4, 32), (3, 12), (8, 16)])
def test_selected_scores_and_gradients_equal_the_full_matrix_read_at_the_selection(dtype, heads, dim):
    g = torch.Generator().manual_seed(heads)
    T = 33
    indexer, x, (cos, sin) = random_indexer(T, heads, dim, dtype=dtype)
    selected = random_selection(2, T, 14, g)  # > 8 keys per row: the eight-wide loops and their remainders
    weights = torch.randn(2, T, 14, generator=g, dtype=dtype)

    scores = fused_selected_index_scores(*indexer.project(x, cos, sin), selected)
    grads = torch.autograd.grad((scores * weights).sum(), list(indexer.parameters()))
    full, _ = indexer(x, cos, sin)
    expected = gather_selected(full, selected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(indexer.parameters()))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, expected, **tol)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **tol)


def hand_kl(target: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) of every row, one row at a time over its valid slots, in the inputs' dtype:
    p = the target there / its sum; 0 for a row with no valid slot or no target mass."""
    B, T, _ = selected.shape
    rows = []
    for b in range(B):
        for t in range(T):
            valid = selected[b, t] >= 0
            p, s = target[b, t][valid], scores[b, t][valid]
            if len(p) == 0 or p.sum() == 0:
                rows.append(s.sum() * 0)  # keeps the graph: no gradient from this row
                continue
            p = p / p.sum()
            log_q = s - torch.logsumexp(s, 0)
            rows.append(torch.where(p > 0, p * (torch.where(p > 0, p, 1).log() - log_q), 0).sum())
    return torch.stack(rows).view(B, T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,dim", [(4, 32), (3, 12)])
def test_the_selected_key_kl_and_its_gradients_equal_a_row_by_row_kl_of_the_full_matrix(dtype, heads, dim):
    """The fused loss == KL computed row by row from the full score matrix read at the selection:
    unfilled slots ignored, zero target weights (0 log 0 = 0), a row with no target mass = 0,
    a row without keys = 0; gradients of the indexer's parameters under uneven row weights."""
    g = torch.Generator().manual_seed(heads + dim)
    T = 33
    indexer, x, (cos, sin) = random_indexer(T, heads, dim, seed=1, dtype=dtype)
    selected = random_selection(2, T, 14, g)
    selected[1, 20] = -1  # a row without keys
    target = torch.rand(2, T, 14, generator=g, dtype=dtype) * (selected >= 0)
    target[target < 0.2] = 0  # zero weights on valid keys
    target[0, 30] = 0  # a row whose target has no mass
    row_weights = torch.rand(2, T, generator=g, dtype=dtype)

    kl = fused_selected_index_kl(*indexer.project(x, cos, sin), selected, target)
    grads = torch.autograd.grad((kl * row_weights).sum(), list(indexer.parameters()))
    full, _ = indexer(x, cos, sin)
    expected = hand_kl(target, gather_selected(full, selected), selected)
    expected_grads = torch.autograd.grad((expected * row_weights).sum(), list(indexer.parameters()))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert kl[1, 20] == 0 and kl[0, 30] == 0 and (kl >= -1e-6).all()
    torch.testing.assert_close(kl, expected, **tol)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **tol)


def test_the_selected_key_kl_of_every_kernel_is_indexer_kl_of_the_selected_scores():
    """`selected_index_kl` == `indexer_kl(target, selected_index_scores(...), selected >= 0)` with
    each kernel: the model's sparse-stage loss did not change when it moved into the kernel."""
    g = torch.Generator().manual_seed(5)
    T = 40
    indexer, x, (cos, sin) = random_indexer(T, 4, 16, batch=1, seed=2, dtype=torch.float32)
    projected = indexer.project(x, cos, sin)
    selected = select_keys("topk", top_k=9, seq_len=T, index_scores=torch.randn(1, T, T, generator=g))
    target = torch.rand(1, T, 9, generator=g)
    expected = indexer_kl(target, selected_index_scores(*projected, selected, kernel="copy"), selected >= 0)
    for kernel in ("fused", "csr", "copy", "auto"):
        torch.testing.assert_close(selected_index_kl(*projected, selected, target, kernel=kernel), expected,
                                   rtol=1e-5, atol=1e-6)


def test_the_selected_key_kl_of_bfloat16_inputs_is_computed_in_float32():
    """Under bfloat16 autocast the indexer's projections and the target arrive in bfloat16: the
    loss is the float32 KL of those rounded values, returned in float32 with float32 gradients."""
    g = torch.Generator().manual_seed(8)
    (q, k, w), _ = indexer_inputs(30, 4, 16, seed=8, dtype=torch.float32)
    selected = random_selection(2, 30, 10, g)
    target = torch.rand(2, 30, 10, generator=g) * (selected >= 0)
    q, k, w = (x.detach().bfloat16().requires_grad_() for x in (q, k, w))
    kl = fused_selected_index_kl(q, k, w, selected, target.bfloat16())
    assert kl.dtype == torch.float32
    q32, k32, w32 = (x.detach().float().requires_grad_() for x in (q, k, w))
    expected = fused_selected_index_kl(q32, k32, w32, selected, target.bfloat16().float())
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    expected.sum().backward()
    for got, want in ((q, q32), (k, k32), (w, w32)):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.float(), want.grad.bfloat16().float())


def test_the_selected_key_kl_keeps_its_bfloat16_target_as_given_for_backward():
    """The target (the main attention at the selected keys, bfloat16 under autocast) is saved as it
    came, not as a float32 copy twice its size; the loss and gradients are those of the float32 target."""
    g = torch.Generator().manual_seed(9)
    (q, k, w), _ = indexer_inputs(30, 4, 16, seed=9, dtype=torch.float32)
    q, k, w = (x.detach().requires_grad_() for x in (q, k, w))
    selected = random_selection(2, 30, 10, g)
    target = (torch.rand(2, 30, 10, generator=g) * (selected >= 0)).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kl = fused_selected_index_kl(q, k, w, selected, target)
    per_slot = [t for t in saved if t.shape == target.shape and t.is_floating_point()]
    assert len(per_slot) == 1 and per_slot[0].dtype == torch.bfloat16
    grads = torch.autograd.grad(kl.sum(), (q, k, w))
    q32, k32, w32 = (x.detach().requires_grad_() for x in (q, k, w))
    expected = fused_selected_index_kl(q32, k32, w32, selected, target.float())
    torch.testing.assert_close(kl, expected, rtol=0, atol=0)
    for grad, want in zip(grads, torch.autograd.grad(expected.sum(), (q32, k32, w32))):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_a_sparse_training_step_is_the_csr_kernels_step(kv_heads):
    """The model's sparse stage on the fused kernels (the default on CPU) == on the CSR kernels:
    logits, per-layer KL and every gradient; with one key/value head per query head and with one
    shared by all (the CSR kernels repeat it)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, d_ff=48,
                         max_seq_len=80, top_k=8, indexer_heads=4, indexer_dim=8, indexer_rope_dim=4)
    model = SparseTransformer(config)
    ids = torch.randint(0, 50, (2, 80))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, attention="sparse", indexer_loss="selected")
        (out.logits.square().mean() + out.indexer_kl.sum()).backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    fused_out, fused_grads = step()
    with fused_kernels_disabled():
        assert not fused_kernels_available(ids.float())
        csr_out, csr_grads = step()
    assert fused_kernels_available(ids.float())
    torch.testing.assert_close(fused_out.logits, csr_out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out.indexer_kl, csr_out.indexer_kl, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == csr_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], csr_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_switched_off_the_model_runs_on_the_csr_kernels_and_asking_for_fused_is_one_clear_error():
    code = (
        "import torch\n"
        "from sparse_viz.model.fused_kernels import fused_kernels_available, fused_selected_attention\n"
        "assert not fused_kernels_available(torch.zeros(1))\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "try:\n"
        "    fused_selected_attention(q, q, q, torch.zeros(1, 4, 1, dtype=torch.long))\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, SPARSE_VIZ_FUSED_KERNELS="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "fused CPU kernels are not available (SPARSE_VIZ_FUSED_KERNELS=0)" in done.stdout


def test_where_the_kernels_cannot_be_built_the_model_runs_after_one_warning_naming_why(tmp_path):
    code = (
        "import torch\n"
        "from sparse_viz.model import ModelConfig, SparseTransformer\n"
        "config = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=40, top_k=4,\n"
        "                     indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)\n"
        "out = SparseTransformer(config)(torch.randint(0, 50, (1, 40)), attention='sparse', indexer_loss='selected')\n"
        "print('ran', tuple(out.logits.shape), bool(torch.isfinite(out.indexer_kl).all()))\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "ran (1, 40, 50) True" in done.stdout
    ours = [line for line in done.stderr.splitlines() if "fused CPU kernels could not be built" in line]
    assert len(ours) == 1 and "no-compiler: not found" in ours[0]


def test_tensors_off_the_cpu_are_refused():
    q = torch.empty(1, 1, 4, 8, device="meta")
    with pytest.raises(ValueError, match="CPU tensors only"):
        fused_selected_attention(q, q, q, torch.zeros(1, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        fused_index_topk(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 2), 0)


def test_the_kl_operators_refuse_a_target_not_shaped_like_the_selection():
    """The kernels read the target with the selection's row stride: a mis-shaped one must be refused,
    in backward as in forward, not read out of bounds."""
    ops = load_fused_kernels()
    (q, k, w), _ = indexer_inputs(12, 2, 8, dtype=torch.float32)
    q, k, w = (x.detach().contiguous() for x in (q, k, w))
    selected = random_selection(2, 12, 4, torch.Generator().manual_seed(0))
    target = torch.rand(2, 12, 4)
    kl, lse = ops.selected_index_kl_forward(q, k, w, selected, target)
    with pytest.raises(RuntimeError, match="target must be a contiguous"):
        ops.selected_index_kl_forward(q, k, w, selected, target[:, :, :3].contiguous())
    with pytest.raises(RuntimeError, match="target must be a contiguous"):
        ops.selected_index_kl_backward(torch.ones_like(kl), q, k, w, selected, target[:, :, :3].contiguous(), lse)
    with pytest.raises(RuntimeError, match="grad_kl and lse must be contiguous"):
        ops.selected_index_kl_backward(torch.ones_like(kl), q, k, w, selected, target, lse.t())


@pytest.mark.parametrize("kv_heads", [4, 2])  # the key pass (it transposes the selection); the scatter
def test_int32_selections_give_the_int64_selections_results(kv_heads):
    """The kernels read the selection as int64 or int32 (the model hands them int32: the copy their
    backward keeps is half the size). The same keys give the same numbers, bit for bit."""
    g = torch.Generator().manual_seed(12)
    B, H, T, D, K = 2, 4, 37, 16, 20
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    selected = random_selection(B, T, K, g)
    weights = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    results = []
    for selection in (selected, selected.to(torch.int32)):
        out, probs = fused_selected_attention(q, k, v, selection, per_head_probs=True)
        results.append((out, probs, *torch.autograd.grad((out * weights).sum(), (q, k, v))))
    for got, want in zip(*results):
        assert torch.equal(got, want)

    (q_i, k_i, w_i), _ = indexer_inputs(T, 4, 16, seed=12)
    q_i, k_i, w_i = (x.detach().requires_grad_() for x in (q_i, k_i, w_i))
    target = torch.rand(B, T, K, generator=g, dtype=torch.float64) * (selected >= 0)
    results = []
    for selection in (selected, selected.to(torch.int32)):
        scores = fused_selected_index_scores(q_i, k_i, w_i, selection)
        kl = fused_selected_index_kl(q_i, k_i, w_i, selection, target)
        grads = torch.autograd.grad((scores * target).sum() + kl.sum(), (q_i, k_i, w_i))
        results.append((scores, kl, *grads))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_a_selection_of_another_integer_type_is_refused():
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        fused_selected_attention(q, q, q, torch.zeros(1, 5, 2, dtype=torch.int16))
