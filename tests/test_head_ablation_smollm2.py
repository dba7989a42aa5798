"""Head ablation on the real SmolLM2-135M (30 layers, 9 heads / 3 KV heads): sanity, not tuned numbers."""

from __future__ import annotations

import pytest

from sparse_viz.analysis.ablation.heads import (
    AttentionLayout,
    build_ablations,
    head_ablation_study,
)

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from sparse_viz.pretrained.loading import load_model

    return load_model(smollm2_dir, device="cpu", dtype="float32")


def test_whole_layer_changes_top1_single_heads_change_few(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    layout = AttentionLayout.of(model)
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads) == (30, 9, 3)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    layer = 1
    ablations = build_ablations(layout, ablate=[f"{layer}.{h}" for h in range(layout.n_heads)])  # all together
    ablations += [a for a in build_ablations(layout, sweep=True) if a.heads[0][0] == layer]  # each alone
    result = head_ablation_study(model, ids, ablations, batch_size=10, patterns=False, tokenizer=tokenizer, progress=False)
    whole = result.table.iloc[0]
    singles = result.table.iloc[1:]
    assert whole["n_heads_ablated"] == 9 and len(singles) == 9
    assert whole["frac_top1_changed"] >= 0.2  # removing a whole layer's attention matters
    assert singles["frac_top1_changed"].median() < whole["frac_top1_changed"] / 2  # one head: typically few
    assert whole["kl_divergence"] > singles["kl_divergence"].max()
    # the unablated model answers " Madrid"; the prediction table reports it as the baseline top-1
    assert result.predictions[0][0]["before"][0]["token"].strip() == "Madrid"


def test_kv_head_equals_its_three_query_heads_on_smollm2(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    layout = AttentionLayout.of(model)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    ablations = build_ablations(layout, ablate_kv=["5.1"]) + build_ablations(layout, ablate=["5.3", "5.4", "5.5"])
    result = head_ablation_study(model, ids, ablations, batch_size=2, patterns=False, progress=False)
    kv, group = result.table.iloc[0], result.table.iloc[1]
    assert kv["kl_divergence"] == pytest.approx(group["kl_divergence"], rel=1e-4, abs=1e-7)
    assert kv["frac_top1_changed"] == group["frac_top1_changed"]


def test_component_sweep_largest_svd_direction_matters_more_than_the_smallest(smollm2):
    """Sanity on the SVD baseline: removing s_0 u_0 v_0^T of an o_proj moves the predictions more
    than removing the smallest-singular-value term, whose weight change is ~100x smaller."""
    from sparse_viz.analysis.ablation.component_sweep import run_component_sweep

    table = run_component_sweep(smollm2, PROMPT, ["1.o_proj:0,575"], patterns=False, progress=False)
    largest, smallest = table.iloc[0], table.iloc[1]
    assert largest["component_norm"] > 50 * smallest["component_norm"]
    assert largest["kl_divergence"] > 10 * smallest["kl_divergence"]
    assert table["reconstruction_kl"].iloc[0] < 1e-6  # the SVD reconstructs o_proj up to rounding
