"""The blockwise indexer path (`indexer_blocks.py`) against the full-matrix reference
(`LightningIndexer.forward`, `topk_causal`, `indexer_kl` on (B, T, T) tensors): selections,
scores at the selected keys, both KL losses and their gradients; causality; and that a
training step of each stage creates no T x T tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.attention import causal_attention_probs, gather_selected
from sparse_viz.model.indexer import LightningIndexer, indexer_kl
from sparse_viz.model.indexer_blocks import (
    block_index_scores,
    blockwise_causal_kl,
    blockwise_topk,
    selected_index_scores,
)
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import topk_causal, topk_earliest_ties

BLOCK_SIZES = [1, 3, 7, 16, 64]  # 3 and 7 do not divide T = 23; 64 > T


def indexer_and_input(T: int, batch: int = 2, seed: int = 0):
    """A random indexer (LayerNorm not the identity), an input and its RoPE tables."""
    torch.manual_seed(seed)
    config = ModelConfig(d_model=24, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    indexer = LightningIndexer(config)
    with torch.no_grad():
        indexer.k_norm.weight.uniform_(0.5, 1.5)
        indexer.k_norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(batch, T, 24)
    cos, sin = rope_tables(4, T, 10000.0)
    return indexer, x, cos, sin


@pytest.mark.parametrize("start,size", [(0, 5), (4, 1), (9, 7), (20, 3)])
def test_a_block_of_scores_is_the_full_matrix_block(start, size):
    indexer, x, cos, sin = indexer_and_input(23)
    full, _ = indexer(x, cos, sin)  # (B, T, T)
    q, k, w = indexer.project(x, cos, sin)
    end = start + size
    block = block_index_scores(q[:, start:end], k[:, :end], w[:, start:end], start)  # (B, size, end)
    torch.testing.assert_close(block, full[:, start:end, :end], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("top_k", [1, 4, 9, 40])  # 40 > T: every row is short, all dense
def test_blockwise_selection_equals_the_full_matrix_topk(block_size, top_k):
    """Identical selections, exact ties included (both keep the earliest tied keys).

    Exact ties are frequent here (a key whose head products are all negative scores exactly 0),
    so the test would catch a tie broken differently. Scores that differ only in the last bit
    between the block and full products could in principle swap two keys; none do in this data.
    """
    T = 23
    indexer, x, cos, sin = indexer_and_input(T)
    full, _ = indexer(x, cos, sin)
    assert (full == 0).any(), "the data should contain exact ties at 0"
    expected = topk_causal(full, top_k)  # (B, T, k)
    q, k, w = indexer.project(x, cos, sin)
    selected = blockwise_topk(q, k, w, top_k, block_size)
    assert torch.equal(selected, expected)



@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_under_autocast_the_ranking_reads_q_and_k_rounded_as_the_full_paths_matmul_does(kernel):
    """Under bfloat16 autocast the full path's `q @ k^T` takes q and k in bfloat16; the blockwise
    top-k ranks on the same rounded inputs (their products, exact in float32, summed there).

    The queries are integers of magnitude 1 or 2 nudged by 2^-10, which bfloat16 rounds off (its
    spacing at 1 is 2^-7); keys and weights are integers (the weights in bfloat16, as autocast's
    projection makes them). The rounded scores are integers with many exact ties, broken the
    earliest-key way; the nudges, kept, would break them otherwise (checked below)."""
    g = torch.Generator().manual_seed(5)
    B, T, heads, dim = 2, 200, 4, 8  # 4 heads of even size: the fused kernel's bfloat16 tiles
    sign = lambda shape: torch.randint(0, 2, shape, generator=g).mul(2).sub(1)
    q_rounded = (torch.randint(1, 3, (B, T, heads, dim), generator=g) * sign((B, T, heads, dim))).float()
    q = q_rounded + 2**-10 * sign(q_rounded.shape)  # (B, T, H_I, d_I) float32, as RoPE leaves it
    assert torch.equal(q.bfloat16().float(), q_rounded)
    k = torch.randint(-2, 3, (B, T, dim), generator=g).float()
    w = torch.randint(1, 3, (B, T, heads), generator=g).to(torch.bfloat16)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)

    def scores(queries):  # (B, T, T) in float64
        s = torch.einsum("bthd,bsd->bths", queries.double(), k.double()).relu().mul(w.double()[..., None]).sum(2)
        return s.masked_fill(causal, float("-inf"))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        selected = blockwise_topk(q, k, w, 16, 7, kernel=kernel)
    assert torch.equal(selected, topk_causal(scores(q_rounded), 16))
    assert not torch.equal(topk_causal(scores(q), 16), topk_causal(scores(q_rounded), 16))


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_under_autocast_a_real_indexers_selection_is_the_topk_of_its_rounded_q_and_k(kernel):
    """The projections as autocast makes them: the selection is the top-k of the float64 scores of q and k rounded to
    bfloat16, up to float32 rounding of the sums (a block path computing in bfloat16 would be off
    by its products' rounding, ~1e-3 relative)."""
    T, top_k = 200, 24
    indexer, x, cos, sin = indexer_and_input(T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, w = indexer.project(x, cos, sin)
        selected = blockwise_topk(q, k, w, top_k, 7, kernel=kernel)
    assert w.dtype == torch.bfloat16  # autocast's projection
    scores = torch.einsum("bthd,bsd->bths", q.bfloat16().double(), k.bfloat16().double())
    scores = scores.relu().mul(w.double()[..., None]).sum(2)  # (B, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    chosen = gather_selected(scores, selected)[:, top_k:]  # rows with more than k keys
    left_out = scores.scatter(-1, selected.clamp(min=0), float("-inf"))[:, top_k:]
    tolerance = 1e-6 * scores[:, top_k:].abs().nan_to_num(posinf=0, neginf=0).amax(-1)
    assert (left_out.max(-1).values <= chosen.min(-1).values + tolerance).all()
    assert (selected != topk_causal(scores, top_k)).any(-1).float().mean() < 0.02


def test_ties_at_the_kth_score_keep_the_earliest_keys_whatever_the_row_length():
    inf = float("-inf")
    row = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 3.0])  # top 3: keys 6, 1, then 3; top 5 ties at 0
    assert sorted(topk_earliest_ties(row, 3).tolist()) == [1, 3, 6]
    assert sorted(topk_earliest_ties(row, 5).tolist()) == [0, 1, 2, 3, 6]  # zeros at 0, 2 (not 4, 5)
    longer = torch.cat((row, torch.zeros(40), torch.full((300,), inf)))  # more tied zeros, then a masked future
    assert sorted(topk_earliest_ties(longer, 5).tolist()) == [0, 1, 2, 3, 6]
    batch = torch.stack((row, row.flip(0)))  # a tied row and, flipped, the same values mirrored
    assert [sorted(r) for r in topk_earliest_ties(batch, 5).tolist()] == [[0, 1, 2, 3, 6], [0, 1, 2, 3, 5]]


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_no_future_key_is_selected_and_short_rows_are_dense(block_size):
    T, top_k = 30, 6
    indexer, x, cos, sin = indexer_and_input(T)
    q, k, w = indexer.project(x, cos, sin)
    selected = blockwise_topk(q, k, w, top_k, block_size)  # (B, T, 6)
    t = torch.arange(T)[None, :, None]
    assert ((selected <= t) & (selected >= -1)).all()
    for row in range(top_k):  # t + 1 <= k: every past key, ascending, then -1
        expected = list(range(row + 1)) + [-1] * (top_k - row - 1)
        assert selected[:, row].tolist() == [expected, expected]
    for row in range(top_k, T):  # long rows: k distinct past keys
        assert (selected[:, row] >= 0).all() and all(len(set(r)) == top_k for r in selected[:, row].tolist())


@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_perturbing_later_tokens_never_changes_an_earlier_selection(block_size):
    T, top_k, s = 20, 4, 11
    indexer, x, cos, sin = indexer_and_input(T)
    before = blockwise_topk(*indexer.project(x, cos, sin), top_k, block_size)
    x2 = x.clone()
    x2[:, s:] = torch.randn_like(x2[:, s:]) * 3
    after = blockwise_topk(*indexer.project(x2, cos, sin), top_k, block_size)
    assert torch.equal(before[:, :s], after[:, :s])
    assert not torch.equal(before[:, s:], after[:, s:])  # the perturbation did reach later rows


def indexer_grads(indexer: LightningIndexer, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(indexer.parameters())))


@pytest.mark.parametrize("kernel", ["csr", "copy"])
def test_scores_kl_and_gradients_at_the_selected_keys_equal_the_full_path(kernel):
    """The sparse stage's loss: KL(p[t, S_t] || softmax(I[t, S_t])) from selected-key scores
    == the same from the (B, T, T) matrix read at S_t; gradients to the indexer's weights too."""
    T, top_k = 23, 5
    indexer, x, cos, sin = indexer_and_input(T)
    full, _ = indexer(x, cos, sin)
    selected = topk_causal(full, top_k)  # (B, T, k)
    target = torch.rand(2, T, top_k) * (selected >= 0)  # stands for main attention at S_t
    valid = selected >= 0

    reference_scores = gather_selected(full, selected)  # (B, T, k)
    reference = indexer_kl(target, reference_scores, valid).mean()
    scores = selected_index_scores(*indexer.project(x, cos, sin), selected, kernel=kernel, chunk_size=4)
    kl = indexer_kl(target, scores, valid).mean()

    torch.testing.assert_close(scores, reference_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(indexer_grads(indexer, kl), indexer_grads(indexer, reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blockwise_warmup_kl_and_gradients_equal_the_full_path(block_size, recompute):
    """KL(sum_h p_dense[t, :] || softmax(I[t, :])) over all causal keys, by blocks (checkpointed or kept)."""
    T, H, hd = 23, 2, 6
    indexer, x, cos, sin = indexer_and_input(T)
    q_main, k_main = torch.randn(2, H, T, hd), torch.randn(2, H, T, hd)  # the main attention's q, k

    full, _ = indexer(x, cos, sin)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    reference = indexer_kl(causal_attention_probs(q_main, k_main).sum(1), full, causal)  # (B, T)
    rows = blockwise_causal_kl(*indexer.project(x, cos, sin), q_main, k_main, block_size, recompute=recompute)

    torch.testing.assert_close(rows, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(indexer_grads(indexer, rows.mean()), indexer_grads(indexer, reference.mean())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_blockwise_warmup_kl_under_bfloat16_autocast_is_never_negative():
    """Under autocast the main attention's logits come out of a bfloat16 matmul. The target is
    normalised in float32 from them (as `indexer_kl` normalises its own): a target normalised in
    bfloat16 sums to 1 only within ~2^-8, and its "KL" went below 0 by as much."""
    T, H, hd = 64, 4, 16
    indexer, x, cos, sin = indexer_and_input(T, seed=3)
    g = torch.Generator().manual_seed(3)
    q_main, k_main = (torch.randn(2, H, T, hd, generator=g).bfloat16() for _ in range(2))
    projected = indexer.project(x, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = blockwise_causal_kl(*projected, q_main, k_main, 16)
    assert rows.dtype == torch.float32
    assert (rows >= -1e-6).all(), f"min KL {rows.min().item():.2e}"
    in_float32 = blockwise_causal_kl(*projected, q_main.float(), k_main.float(), 16)
    torch.testing.assert_close(rows, in_float32, rtol=0.05, atol=0.02)  # bfloat16 logits and scores


def model_pair(**overrides):
    """Two models with the same weights: the full-matrix indexer path and the blockwise one."""
    fields = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=40, top_k=6,
                  indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    fields.update(overrides)
    torch.manual_seed(0)
    full = SparseTransformer(ModelConfig(**fields, indexer_path="full"))
    blocks = SparseTransformer(ModelConfig(**fields, indexer_path="blockwise", indexer_block_size=7))
    blocks.load_state_dict(full.state_dict())
    return full, blocks


@pytest.mark.parametrize("attention_path", ["gathered", "masked"])
@pytest.mark.parametrize("attention,indexer_loss", [("sparse", "selected"), ("dense", "all"), ("sparse", None)])
def test_model_step_is_the_same_on_both_indexer_paths(attention_path, attention, indexer_loss):
    """Logits, per-layer indexer KL and every gradient of one training step agree (fp32, 1e-5)."""
    full, blocks = model_pair(attention_path=attention_path)
    ids = torch.randint(0, 37, (2, 31), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (full, blocks):
        out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        if out.indexer_kl is not None:
            loss = loss + out.indexer_kl.sum()
        model.zero_grad()
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_full, grads_full), (out_blocks, grads_blocks) = results
    torch.testing.assert_close(out_blocks.logits, out_full.logits, rtol=1e-5, atol=1e-5)
    if indexer_loss is not None:
        torch.testing.assert_close(out_blocks.indexer_kl, out_full.indexer_kl, rtol=1e-5, atol=1e-6)
    for name, grad in grads_full.items():
        if grad is None:
            assert grads_blocks[name] is None, name
        else:
            torch.testing.assert_close(grads_blocks[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse and t.layout == torch.strided and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("attention,indexer_loss", [("sparse", "selected"), ("dense", "all"), ("sparse", None)])
def test_no_op_of_a_blockwise_training_step_makes_a_t_by_t_tensor(attention, indexer_loss):
    """The memory claim as a specification: with T = 512 and a block of 32, no tensor of a
    forward + backward holds T*T / 4 elements (the full path makes (B, T, H_I, T) ones)."""
    T = 512
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=T, top_k=16,
                         indexer_heads=2, indexer_dim=8, indexer_rope_dim=4, indexer_block_size=32)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (1, T + 1))
    sizes = {}
    for path in ("full", "blockwise"):
        model = SparseTransformer(ModelConfig(**{**config.to_dict(), "indexer_path": path}))
        with LargestTensor() as probe:
            out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
            if out.indexer_kl is not None:
                loss = loss + out.indexer_kl.sum()
            loss.backward()
        sizes[path] = (probe.largest, probe.op)
    assert sizes["full"][0] >= T * T  # the probe does see the reference's T x T tensors
    assert sizes["blockwise"][0] < T * T // 4, sizes["blockwise"]


def test_long_sequence_one_step_of_each_stage():
    """T = 2048: one optimizer step of dense, warm-up and sparse on the default (blockwise) path;
    finite losses, the indexer learns in every stage, the main model not in warm-up (~2 s)."""
    T = 2048
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=2, d_ff=128,
                                          max_seq_len=T, top_k=64, indexer_heads=2, indexer_dim=16,
                                          indexer_rope_dim=8))
    ids = torch.randint(0, 128, (1, T + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for attention, indexer_loss, trains_main in (("dense", "all", True), ("dense", "all", False),
                                                 ("sparse", "selected", True)):
        for p in model.main_parameters():
            p.requires_grad_(trains_main)
        before = [p.detach().clone() for p in model.parameters()]
        out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
        lm = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = (lm if trains_main else 0.0) + out.indexer_kl.sum()
        assert torch.isfinite(lm) and torch.isfinite(out.indexer_kl).all() and (out.indexer_kl > 0).all()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        changed = {id(p) for p, b in zip(model.parameters(), before) if not torch.equal(p, b)}
        assert all(id(p) in changed for p in model.indexer_parameters())
        assert all((id(p) in changed) == trains_main for p in model.main_parameters())
