"""Gradient isolation (DeepSeek stage 2): the LM loss trains only the main model, the indexer
loss trains only the indexer; the indexer's input is detached and top-k carries no gradient."""

import pytest
import torch
import torch.nn.functional as F

from sparse_viz.model import ModelConfig, SparseTransformer


def tiny_model(**overrides) -> SparseTransformer:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=41, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32, top_k=4,
        indexer_heads=2, indexer_dim=8, indexer_rope_dim=4,
    )
    fields.update(overrides)
    return SparseTransformer(ModelConfig(**fields))


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]


def total_abs(tensors: list[torch.Tensor]) -> float:
    return sum(t.abs().sum().item() for t in tensors)


def test_parameter_groups_are_disjoint_and_cover_the_model():
    model = tiny_model()
    main = {id(p) for p in model.main_parameters()}
    indexer = {id(p) for p in model.indexer_parameters()}
    assert main.isdisjoint(indexer)
    assert main | indexer == {id(p) for p in model.parameters()}
    assert len(indexer) == 2 * 5  # per layer: wq, wk, k_norm weight and bias, ww
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", ["masked", "gathered"])
@pytest.mark.parametrize("attention,indexer_loss", [("sparse", "selected"), ("sparse", "all"), ("dense", "all")])
def test_lm_loss_reaches_only_main_and_indexer_loss_only_indexer(path, attention, indexer_loss):
    model = tiny_model(attention_path=path).train()
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
    lm_loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    kl_loss = out.indexer_kl.sum()
    main, indexer = model.main_parameters(), model.indexer_parameters()

    assert total_abs(grads(lm_loss, indexer)) == 0.0
    assert total_abs(grads(kl_loss, main)) == 0.0
    # ...and each loss does train its own side (otherwise the zeros above would prove nothing).
    assert total_abs(grads(lm_loss, main)) > 0.0
    assert total_abs(grads(kl_loss, indexer)) > 0.0
