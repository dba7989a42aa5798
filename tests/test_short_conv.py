"""The causal short convolution (`short_conv`): what the loop says, never a future token, and a
model with it refuses to pose as a Llama for the probes."""

from __future__ import annotations

import pytest
import torch

from sparse_viz.errors import UserInputError
from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.short_conv import CausalShortConv, short_conv_reference
from sparse_viz.pretrained.dsa_checkpoint import llama_from_dsa


@pytest.mark.parametrize("kernel_size", [1, 2, 4, 7])
def test_the_module_is_the_loop_over_positions_and_taps(kernel_size):
    torch.manual_seed(kernel_size)
    conv = CausalShortConv(6, kernel_size)
    h = torch.randn(3, 9, 6)
    torch.testing.assert_close(conv(h), short_conv_reference(h, conv.conv.weight.detach()), rtol=1e-5, atol=1e-6)


def test_two_taps_by_hand():
    """K = 2: out_t = h_t + w1 * h_t + w0 * h_{t-1}, and position 0 has no predecessor."""
    conv = CausalShortConv(1, 2)
    with torch.no_grad():
        conv.conv.weight.copy_(torch.tensor([[[0.5, 2.0]]]))  # (d=1, 1, K=2): w0 = 0.5 (t - 1), w1 = 2.0 (t)
    h = torch.tensor([[[1.0], [10.0], [100.0]]])  # (B=1, T=3, d=1)
    expected = torch.tensor([[[1.0 + 2.0]], [[10.0 + 20.0 + 0.5]], [[100.0 + 200.0 + 5.0]]]).reshape(1, 3, 1)
    torch.testing.assert_close(conv(h), expected)


@pytest.mark.parametrize("selector", ["dense", "topk", "local"])
def test_a_model_with_it_never_reads_a_later_token(selector):
    """Changing tokens from position 9 on leaves every logit before 9 unchanged."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16,
                         short_conv=4, selector=selector, top_k=4, use_indexer=selector == "topk",
                         indexer_heads=2, indexer_dim=16, indexer_rope_dim=8)
    model = SparseTransformer(config).eval()
    tokens = torch.randint(0, 32, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_the_attention_and_the_indexer_read_the_filtered_input():
    """With the filter's taps zeroed but the current one, the model equals the same weights
    without a filter whose attention-norm scale absorbs (1 + w): the filter sits between the
    norm and both readers, and nothing else."""
    torch.manual_seed(1)
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=12, top_k=3,
                indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)
    with_conv = SparseTransformer(ModelConfig(**base, short_conv=3)).eval()
    plain = SparseTransformer(ModelConfig(**base)).eval()
    state = {k: v for k, v in with_conv.state_dict().items() if "short_conv" not in k}
    plain.load_state_dict(state)
    with torch.no_grad():
        for conv_block, plain_block in zip(with_conv.blocks, plain.blocks):
            weight = torch.zeros_like(conv_block.short_conv.conv.weight)  # (d, 1, K)
            weight[:, 0, -1] = torch.linspace(-0.5, 0.5, weight.shape[0])  # the current position only
            conv_block.short_conv.conv.weight.copy_(weight)
            plain_block.attn_norm.weight.mul_(1.0 + weight[:, 0, -1])
    tokens = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        for attention in ("dense", "sparse"):
            a = with_conv(tokens, attention=attention, indexer_loss="all" if attention == "dense" else "selected")
            b = plain(tokens, attention=attention, indexer_loss="all" if attention == "dense" else "selected")
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.indexer_kl, b.indexer_kl, rtol=1e-5, atol=1e-6)


def test_its_weights_learn_from_the_loss():
    torch.manual_seed(2)
    model = SparseTransformer(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                          max_seq_len=8, short_conv=2, selector="dense", use_indexer=False))
    tokens = torch.randint(0, 16, (2, 8))
    logits = model(tokens).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert model.blocks[0].short_conv.conv.weight.grad.abs().sum() > 0


def test_a_negative_width_is_refused():
    with pytest.raises(ValueError, match="short_conv"):
        ModelConfig(short_conv=-1)


def test_a_checkpoint_with_it_cannot_be_mapped_onto_a_llama():
    config = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8, short_conv=4)
    state = SparseTransformer(config).state_dict()
    with pytest.raises(UserInputError, match="short convolution"):
        llama_from_dsa(config, state)
