"""No future leak: changing token s never changes the logits of any earlier position.

Checked by perturbation for every selector and both sparse attention paths, in train() and
eval() mode, on rows long enough that the selection is really sparse (T > top_k).
"""

import pytest
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.attention import masked_sparse_attention
from sparse_viz.model.config import ATTENTION_PATHS, SELECTORS

T = 14
TOP_K = 4


def tiny_model(selector: str, path: str) -> SparseTransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=37, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32,
        selector=selector, top_k=TOP_K, sink_tokens=1, attention_path=path,
        indexer_heads=2, indexer_dim=8, indexer_rope_dim=4,
    )
    return SparseTransformer(config)


def perturbed_copy(ids: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 1 + torch.arange(ids.shape[0])) % vocab_size
    return changed


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("path", ATTENTION_PATHS)
@pytest.mark.parametrize("selector", SELECTORS)
def test_perturbing_a_token_never_changes_earlier_logits(selector, path, mode):
    model = tiny_model(selector, path)
    model.train(mode == "train")
    ids = torch.randint(0, 37, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits  # (B, T, V)
        for s in (1, TOP_K, T // 2, T - 1):
            changed = model(perturbed_copy(ids, s, 37)).logits
            torch.testing.assert_close(changed[:, :s], base[:, :s], rtol=0, atol=1e-6)
            # The perturbation is real: position s itself sees the new token.
            assert (changed[:, s] - base[:, s]).abs().max() > 1e-4


@pytest.mark.parametrize("selector", ["topk", "oracle", "random"])
def test_traced_selections_are_causal_and_unaffected_by_later_tokens(selector):
    model = tiny_model(selector, "gathered").eval()
    ids = torch.randint(0, 37, (1, T), generator=torch.Generator().manual_seed(2))
    s = T // 2
    with torch.no_grad():
        before = model(ids, trace="select").traces
        after = model(perturbed_copy(ids, s, 37), trace="select").traces
    t = torch.arange(T)[:, None]
    for layer_before, layer_after in zip(before, after):
        assert (layer_before.selected <= t).all()
        assert torch.equal(layer_before.selected[:, :s], layer_after.selected[:, :s])


def test_the_perturbation_check_catches_a_selection_that_includes_future_keys():
    """Negative control: a leaky selection (every key, future included) IS detected."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    leaky = torch.arange(8).expand(1, 8, 8)  # (B, T, k): row t selects 0..7, future included
    out, _ = masked_sparse_attention(q, k, v, leaky)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5] += 1.0
    v2[:, :, 5] += 1.0
    out2, _ = masked_sparse_attention(q, k2, v2, leaky)
    assert (out2[:, :, :5] - out[:, :, :5]).abs().max() > 1e-3
