"""The Lightning Indexer against a naive per-(t, s, head) loop of Eq. 1, and its KL loss."""

import math

import pytest
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.indexer import LightningIndexer, indexer_kl
from sparse_viz.model.rope import rope_tables

THETA = 10000.0


def naive_rope(vector: list[float], position: int, rotated: int) -> list[float]:
    """Non-interleaved RoPE written out: pair (i, i + r/2) turns by position * theta^(-2i/r)."""
    out = list(vector)
    half = rotated // 2
    for i in range(half):
        angle = position * THETA ** (-2 * i / rotated)
        a, b = vector[i], vector[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_layer_norm(vector: list[float], weight: list[float], bias: list[float], eps: float) -> list[float]:
    mean = sum(vector) / len(vector)
    var = sum((x - mean) ** 2 for x in vector) / len(vector)
    return [(x - mean) / math.sqrt(var + eps) * w + b for x, w, b in zip(vector, weight, bias)]


def matvec(weight: torch.Tensor, vector: list[float]) -> list[float]:
    return [sum(w * x for w, x in zip(row, vector)) for row in weight.tolist()]


def naive_index_scores(indexer: LightningIndexer, x: torch.Tensor, rope_dim: int, eps: float):
    """Eq. 1 for one sequence x (T, d): I[t][s] and the per-head terms, by plain loops."""
    H, d = indexer.n_heads, indexer.head_dim
    T = x.shape[0]
    rows = x.tolist()
    ln_w, ln_b = indexer.k_norm.weight.tolist(), indexer.k_norm.bias.tolist()
    keys = [naive_rope(naive_layer_norm(matvec(indexer.wk.weight, rows[s]), ln_w, ln_b, eps), s, rope_dim) for s in range(T)]
    scores = [[-math.inf] * T for _ in range(T)]
    terms = [[[0.0] * T for _ in range(T)] for _ in range(H)]
    for t in range(T):
        q_flat = matvec(indexer.wq.weight, rows[t])
        w = [value * H**-0.5 for value in matvec(indexer.ww.weight, rows[t])]
        for s in range(t + 1):
            total = 0.0
            for j in range(H):
                q_j = naive_rope(q_flat[j * d : (j + 1) * d], t, rope_dim)
                dot = sum(a * b for a, b in zip(q_j, keys[s]))
                term = w[j] * max(dot, 0.0) * d**-0.5
                terms[j][t][s] = term
                total += term
            scores[t][s] = total
    return torch.tensor(scores), torch.tensor(terms)


# DeepSeek's reference builds the indexer key's LayerNorm with its default epsilon, not the
# model's RMSNorm epsilon (REFERENCE §1).
REFERENCE_KEY_NORM_EPS = 1e-6


def test_key_layer_norm_uses_the_reference_epsilon_not_the_models():
    """Keys of tiny variance make the epsilon decide the result: 1e-5 would be far off here."""
    config = ModelConfig(d_model=12, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=0, norm_eps=1e-5)
    torch.manual_seed(0)
    indexer = LightningIndexer(config)
    x = torch.randn(1, 5, 12) * 1e-3  # W_k x has variance ~1e-7, comparable to the epsilon
    cos, sin = rope_tables(0, 5, THETA)
    scores, _ = indexer(x, cos, sin)
    expected, _ = naive_index_scores(indexer, x[0], 0, REFERENCE_KEY_NORM_EPS)
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-9)


def test_under_autocast_the_three_projections_share_one_cast_of_the_input():
    """Autocast casts a linear's input at each call, and backward keeps every copy: the indexer
    casts its input once for W_q, W_k and W_w. The numbers are autocast's own (its projections of
    the input in bfloat16); the memory kept is one bfloat16 copy, not three."""
    config = ModelConfig(d_model=16, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=4)
    torch.manual_seed(0)
    indexer = LightningIndexer(config)
    x = torch.randn(2, 7, 16)
    cos, sin = rope_tables(4, 7, THETA)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            projected = indexer.project(x, cos, sin)
        expected = indexer.project(x.bfloat16(), cos, sin)  # autocast leaves a bfloat16 input as it is
    copies = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel() and t.dtype == torch.bfloat16}
    assert len(copies) == 1
    for got, want in zip(projected, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("rope_dim", [0, 4, 8])
def test_index_scores_equal_a_naive_loop_of_eq1(rope_dim):
    config = ModelConfig(d_model=12, n_heads=2, indexer_heads=3, indexer_dim=8, indexer_rope_dim=rope_dim)
    torch.manual_seed(0)
    indexer = LightningIndexer(config)
    with torch.no_grad():  # a LayerNorm that is not the identity, so its use is checked
        indexer.k_norm.weight.uniform_(0.5, 1.5)
        indexer.k_norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 7, 12)
    cos, sin = rope_tables(rope_dim, 7, THETA)
    scores, head_terms = indexer(x, cos, sin, return_head_terms=True)
    fast_scores, no_terms = indexer(x, cos, sin)
    assert no_terms is None
    for b in range(2):
        expected_scores, expected_terms = naive_index_scores(indexer, x[b], rope_dim, REFERENCE_KEY_NORM_EPS)
        torch.testing.assert_close(scores[b], expected_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast_scores[b], expected_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head_terms[b], expected_terms, rtol=1e-5, atol=1e-6)


def test_rope_in_the_indexer_is_half_split_not_interleaved():
    """Rotating a vector with only dim 0 set moves weight into dim r/2 (half-split), not dim 1."""
    cos, sin = rope_tables(4, 3, THETA)
    from sparse_viz.model.rope import apply_partial_rope

    x = torch.zeros(3, 8)
    x[:, 0] = 1.0
    rotated = apply_partial_rope(x, cos, sin)
    assert rotated[2, 2].abs() > 0.5 and rotated[2, 1] == 0.0
    torch.testing.assert_close(rotated[:, 4:], x[:, 4:])  # past the rotated part: untouched


def hand_kl(p: list[float], scores: list[float]) -> float:
    """KL(p || softmax(scores)) on plain lists, support = where scores are finite."""
    finite = [i for i, s in enumerate(scores) if s != -math.inf]
    z = sum(math.exp(scores[i]) for i in finite)
    mass = sum(p[i] for i in finite)
    return sum((p[i] / mass) * math.log((p[i] / mass) / (math.exp(scores[i]) / z)) for i in finite if p[i] > 0)


def test_kl_matches_a_hand_computation_and_stays_finite_on_masked_rows():
    inf = math.inf
    p = torch.tensor([[[0.2, 0.6, 0.2], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]])  # (1, 4, 3)
    scores = torch.tensor([[[0.1, 1.0, -0.5], [2.0, -inf, -inf], [0.3, -inf, -inf], [-inf, -inf, -inf]]], requires_grad=True)
    valid = torch.ones(1, 4, 3, dtype=torch.bool)
    kl = indexer_kl(p, scores, valid)  # (1, 4)
    expected = [
        hand_kl([0.2, 0.6, 0.2], [0.1, 1.0, -0.5]),  # full row
        0.0,  # partly masked: only key 0 left, both sides renormalise to [1]
        0.0,  # a row of length 1
        0.0,  # fully masked: no key, contributes nothing
    ]
    torch.testing.assert_close(kl[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_kl_restricted_to_a_valid_subset_renormalises_both_sides():
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    scores = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])
    valid = torch.tensor([[[True, False, True, True]]])
    kl = indexer_kl(p, scores, valid)
    expected = hand_kl([0.1, 0.0, 0.3, 0.4], [0.5, -math.inf, 2.0, 0.0])
    torch.testing.assert_close(kl, torch.tensor([[expected]]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("indexer_loss,attention", [("all", "dense"), ("all", "sparse"), ("selected", "sparse"), ("selected", "dense")])
def test_model_indexer_kl_is_finite_per_layer_including_the_length_one_row(indexer_loss, attention):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, d_model=32, n_layers=3, n_heads=2, d_ff=48, max_seq_len=16, top_k=3,
                         indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)
    model = SparseTransformer(config)
    out = model(torch.randint(0, 30, (2, 9)), attention=attention, indexer_loss=indexer_loss)
    assert out.indexer_kl.shape == (3,)
    assert torch.isfinite(out.indexer_kl).all() and (out.indexer_kl >= 0).all()
    # A fresh indexer does not predict the attention: the loss is strictly positive.
    assert (out.indexer_kl > 0).all()


def test_warmup_kl_equals_a_brute_force_from_the_traced_probabilities():
    """indexer_kl ('all') == mean over rows of KL(sum_h p / H || softmax(I)) from the full trace."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=16, top_k=3,
                         indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)
    model = SparseTransformer(config)
    out = model(torch.randint(0, 30, (1, 6)), attention="dense", indexer_loss="all", trace="full")
    for layer, trace in enumerate(out.traces):
        p = trace.dense_attn_probs.sum(1) / config.n_heads  # (1, T, T)
        rows = [hand_kl(p[0, t].tolist(), trace.index_scores[0, t].tolist()) for t in range(6)]
        assert out.indexer_kl[layer].item() == pytest.approx(sum(rows) / 6, rel=1e-4, abs=1e-7)


def test_rope_tables_from_a_start_are_those_rows_of_the_whole_tables():
    from sparse_viz.model.rope import rope_tables

    cos, sin = rope_tables(8, 50, 10000.0)
    part_cos, part_sin = rope_tables(8, 50, 10000.0, start=37)
    assert torch.equal(part_cos, cos[37:]) and torch.equal(part_sin, sin[37:])
