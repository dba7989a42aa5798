"""Head ablation against independent references on tiny random Qwen3 and Llama models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from sparse_viz.analysis.ablation.heads import (
    AttentionLayout,
    HeadAblation,
    build_ablations,
    head_ablation_hooks,
    head_ablation_study,
    run_head_ablation,
)
from sparse_viz.analysis.ablation.metrics import kl_per_position, logit_change_metrics
from sparse_viz.errors import UserInputError

VOCAB = 97


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  attn_implementation="eager")
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.fixture(params=["qwen3", "llama"])
def model(request):
    return tiny(request.param)


def ids(n=2, t=9, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def reference_ablated_logits(model, input_ids, heads, positions=None):
    """Independent reference: a plain pre-hook that writes zeros into o_proj's input slice."""
    hd = model.config.head_dim
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = []
    for layer, hs in by_layer.items():
        def pre_hook(module, args, hs=hs):
            z = args[0].clone()
            for h in hs:
                if positions is None:
                    z[:, :, h * hd:(h + 1) * hd] = 0.0
                else:
                    for p in positions:
                        z[:, p, h * hd:(h + 1) * hd] = 0.0
            return (z,)
        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        for h in handles:
            h.remove()


def hand_kl(base, abl):
    p = torch.softmax(base, -1)
    return (p * (torch.log(p) - torch.log_softmax(abl, -1))).sum(-1).mean()


def test_ablation_logits_match_plain_pre_hook(model):
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    for heads, positions in [([(0, 1)], None), ([(1, 3), (2, 0)], None), ([(0, 2)], [2, 5])]:
        expected = reference_ablated_logits(model, x, heads, positions)
        ablation = HeadAblation(heads=tuple(heads), positions=None if positions is None else tuple(positions))
        with head_ablation_hooks(model, [ablation] * x.shape[0], x.shape[1]), torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (got - base).abs().max() > 1e-4  # the ablation does something
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)  # hooks removed


def test_kl_matches_hand_written_formula(model):
    x = ids()
    expected_logits = reference_ablated_logits(model, x, [(1, 2)])
    with torch.no_grad():
        base = model(x).logits
    table = run_head_ablation(model, x, ablate=["1.2"], patterns=False, progress=False)
    kl = hand_kl(base, expected_logits)
    # fp32 cancellation: the two formulas agree to ~1e-4 relative on a KL of ~1e-4
    assert table.loc[0, "kl_divergence"] == pytest.approx(float(kl), rel=1e-3)
    # per position, over ALL sequences (not item 0 only)
    torch.testing.assert_close(kl_per_position(base, expected_logits),
                               (torch.softmax(base, -1) * (torch.log_softmax(base, -1) - torch.log_softmax(expected_logits, -1))).sum(-1))
    changed = (base.argmax(-1) != expected_logits.argmax(-1)).float().mean()
    assert table.loc[0, "frac_top1_changed"] == pytest.approx(float(changed))
    top1 = base.argmax(-1, keepdim=True)
    delta = (torch.log_softmax(expected_logits, -1).gather(-1, top1) - torch.log_softmax(base, -1).gather(-1, top1)).mean()
    assert table.loc[0, "delta_logprob_top1"] == pytest.approx(float(delta), rel=1e-5, abs=1e-7)


def test_metrics_use_every_batch_item_hand_computed():
    base = torch.zeros(2, 1, 3)  # uniform predictions, argmax = token 0
    abl = torch.zeros(2, 1, 3)
    abl[1, 0, 2] = 5.0  # only the SECOND sequence changes, its argmax becomes token 2
    m = logit_change_metrics(base, abl)
    z = 2 + math.exp(5.0)
    kl_item2 = sum(1 / 3 * (math.log(1 / 3) - math.log(q)) for q in (1 / z, 1 / z, math.exp(5.0) / z))
    assert float(m["kl_divergence"]) == pytest.approx(kl_item2 / 2, rel=1e-6)  # mean over 2 positions
    assert float(m["frac_top1_changed"]) == pytest.approx(0.5)
    assert float(m["delta_logprob_top1_mean"]) == pytest.approx((math.log(1 / z) - math.log(1 / 3)) / 2, rel=1e-6)
    valid = torch.tensor([[False], [True]])  # padding excluded from the mean
    assert float(logit_change_metrics(base, abl, valid)["kl_divergence"]) == pytest.approx(kl_item2, rel=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 0.1, 3.0])
def test_fast_metrics_match_float64_formula(scale):
    """The sweep's KL-from-logit-change path == the direct formula evaluated in float64."""
    torch.manual_seed(1)
    base = torch.randn(2, 5, 1000) * 4  # peaked, like an LM's next-token logits
    abl = base + scale * torch.randn_like(base)
    m = logit_change_metrics(base, abl)
    b64, a64 = base.double(), abl.double()
    logp, logq = torch.log_softmax(b64, -1), torch.log_softmax(a64, -1)
    kl64 = (logp.exp() * (logp - logq)).sum(-1)  # (2, 5)
    # relative to the KL itself: fp32 rounding of the logit change, not of the logits
    torch.testing.assert_close(m["kl"].double(), kl64, rtol=1e-4, atol=1e-9)
    top1 = b64.argmax(-1, keepdim=True)
    delta64 = (logq.gather(-1, top1) - logp.gather(-1, top1)).squeeze(-1)
    torch.testing.assert_close(m["delta_logprob_top1"].double(), delta64, rtol=1e-4, atol=1e-6)


def test_metrics_where_the_ablated_model_rules_a_token_out():
    """q = 0 where p > 0 gives KL = inf (fallback path); p = 0 where q > 0 costs nothing."""
    base = torch.tensor([[[0.0, 0.0, float("-inf")]]])  # p = (1/2, 1/2, 0)
    abl = torch.tensor([[[0.0, float("-inf"), 0.0]]])  # q = (1/2, 0, 1/2)
    assert math.isinf(float(logit_change_metrics(base, abl)["kl"]))
    abl = torch.tensor([[[0.0, 0.0, 5.0]]])  # q > 0 everywhere p > 0
    q = torch.softmax(abl[0, 0], -1)
    expected = 0.5 * (math.log(0.5) - math.log(q[0])) + 0.5 * (math.log(0.5) - math.log(q[1]))
    assert float(logit_change_metrics(base, abl)["kl"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_batched_sweep_equals_one_at_a_time(model, padded, monkeypatch):
    """Batched rows + prefix reuse == one full forward per ablation (the reference path)."""
    x = ids(n=2, t=7)
    monkeypatch.setattr("sparse_viz.analysis.ablation.sweep.LM_HEAD_ROWS", 2 * 2 * 7)  # LM head 2 ablations at a time
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[1, 5:] = 0
    layout = AttentionLayout.of(model)
    ablations = build_ablations(layout, sweep=True)
    batched = head_ablation_study(model, x, ablations, attention_mask=mask, batch_size=5, patterns=True, progress=False)
    for i, ablation in enumerate(ablations):
        single = head_ablation_study(model, x, [ablation], attention_mask=mask, batch_size=1, patterns=True,
                                     progress=False, reuse_prefix=False)
        for col in ["kl_divergence", "frac_top1_changed", "delta_logprob_top1"]:
            assert batched.table.loc[i, col] == pytest.approx(single.table.loc[0, col], rel=1e-4, abs=1e-7)
        for layer, pat in single.ablated_patterns[0].items():
            torch.testing.assert_close(torch.from_numpy(batched.ablated_patterns[i][layer]), torch.from_numpy(pat), atol=1e-6, rtol=0)
    assert list(batched.table["ablation"]) == [f"L{L}.H{h}" for L in range(3) for h in range(4)]


def test_sweep_skips_the_layers_before_each_ablation(model):
    calls = [0, 0, 0]
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.model.layers)]
    head_ablation_study(model, ids(), build_ablations(AttentionLayout.of(model), sweep=True), batch_size=4,
                        patterns=False, progress=False)
    for handle in handles:
        handle.remove()
    assert calls == [1 + 1, 1 + 2, 1 + 3]  # baseline + the chunks (of 4 heads = one layer) at or below each layer


def test_rows_join_the_batch_at_their_own_layer(model):
    """A chunk mixing layers 2, 0 and 1 (in that order): each layer runs only the rows that need it."""
    rows_seen = [[], [], []]
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: rows_seen[i].append(a[0].shape[0]))
               for i, layer in enumerate(model.model.layers)]
    x = ids(n=2)
    ablations = build_ablations(AttentionLayout.of(model), ablate=["2.1"]) + build_ablations(AttentionLayout.of(model), ablate=["0.3"]) \
        + build_ablations(AttentionLayout.of(model), ablate=["1.0", "2.2"])
    batched = head_ablation_study(model, x, ablations, batch_size=3, patterns=True, pattern_layers=[0, 1, 2], progress=False)
    for handle in handles:
        handle.remove()
    # baseline (2 sequences), then one forward: layer 0 runs the L0 rows, layer 1 adds the L1+L2 rows, layer 2 all
    assert rows_seen == [[2, 2], [2, 4], [2, 6]]
    for i, ablation in enumerate(ablations):  # results land on their own ablation, not in layer order
        single = head_ablation_study(model, x, [ablation], batch_size=1, patterns=True, pattern_layers=[0, 1, 2],
                                     progress=False, reuse_prefix=False)
        assert batched.table.loc[i, "ablation"] == ablation.name
        assert batched.table.loc[i, "kl_divergence"] == pytest.approx(single.table.loc[0, "kl_divergence"], rel=1e-4, abs=1e-7)
        for layer in (0, 1, 2):
            torch.testing.assert_close(torch.from_numpy(batched.ablated_patterns[i][layer]),
                                       torch.from_numpy(single.ablated_patterns[0][layer]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_position_restricted_sweep_runs_only_the_later_positions(model, padded):
    """Ablations at positions >= p leave earlier positions as they were: the sweep runs only
    positions >= p (attending to the baseline's keys/values), and its KL, top-1 change and
    patterns equal one full forward per ablation with a plain pre-hook."""
    x = ids(n=2, t=9)
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[1, 7:] = 0
    ablations = [HeadAblation(heads=((1, 2),), positions=(6,), name="L1.H2@6"),
                 HeadAblation(heads=((0, 1), (2, 3)), positions=(4, 8), name="L0.H1+L2.H3@4,8"),
                 HeadAblation(heads=((2, 0),), positions=(-1,), name="L2.H0@-1"),
                 HeadAblation(heads=((1, 1),), positions=None, name="L1.H1")]
    queries_seen = [[], [], []]
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: queries_seen[i].append(tuple(a[0].shape[:2])))
               for i, layer in enumerate(model.model.layers)]
    batched = head_ablation_study(model, x, ablations, attention_mask=mask, batch_size=3, patterns=True,
                                  pattern_layers=[0, 1, 2], prediction_positions=[2, -1], progress=False)
    for handle in handles:
        handle.remove()
    # chunk 1 = the three position-restricted ablations (first positions 8, 6, 4 -> offset 4): 5 of 9 positions
    assert (6, 5) in queries_seen[2] and (2, 5) in queries_seen[0]
    valid = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        logp = torch.log_softmax(model(x, attention_mask=mask).logits.double(), -1)
    for i, ablation in enumerate(ablations):
        positions = None if ablation.positions is None else [p % 9 for p in ablation.positions]
        with torch.no_grad():
            logq = torch.log_softmax(_reference_with_mask(model, x, mask, ablation.heads, positions).double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        assert batched.table.loc[i, "kl_divergence"] == pytest.approx(float(kl[valid].mean()), rel=1e-4, abs=1e-9)
        if positions is not None:  # positions before the first ablated one are untouched
            assert np.nanmax(abs(batched.kl_per_position[i][:, : min(positions)])) < 1e-12  # NaN: padding
        single = head_ablation_study(model, x, [ablation], attention_mask=mask, batch_size=1, patterns=True,
                                     pattern_layers=[0, 1, 2], prediction_positions=[2, -1], progress=False,
                                     reuse_prefix=False)
        for layer in (0, 1, 2):
            torch.testing.assert_close(torch.from_numpy(batched.ablated_patterns[i][layer]),
                                       torch.from_numpy(single.ablated_patterns[0][layer]), atol=1e-6, rtol=0)
        # prediction tables, before the offset (position 2: the baseline's) and after it
        for got, want in zip(batched.predictions[i], single.predictions[0], strict=True):
            assert (got["seq"], got["position"]) == (want["seq"], want["position"])
            assert [e["id"] for e in got["after"]] == [e["id"] for e in want["after"]]
            assert got["top1_prob_after"] == pytest.approx(want["top1_prob_after"], rel=1e-4)


def _reference_with_mask(model, x, mask, heads, positions):
    """reference_ablated_logits, with an attention mask (padding)."""
    forward = model.forward
    model.forward = lambda input_ids, **kw: forward(input_ids, attention_mask=mask, **kw)
    try:
        return reference_ablated_logits(model, x, heads, positions)
    finally:
        model.forward = forward


def test_patterns_are_per_sequence_and_match_model(model):
    x = ids(n=3, t=6)
    result = head_ablation_study(model, x, build_ablations(AttentionLayout.of(model), ablate=["0.1"]), progress=False)
    with torch.no_grad():
        attn = model(x, output_attentions=True).attentions
    assert result.baseline_patterns[1].shape == (3, 4, 6, 6)
    torch.testing.assert_close(torch.from_numpy(result.baseline_patterns[1]), attn[1], rtol=0, atol=1e-6)
    ablated_layer1 = result.ablated_patterns[0][1]  # layer after the ablated one: changed
    assert abs(ablated_layer1 - result.baseline_patterns[1]).max() > 1e-5


def test_kv_head_ablation_equals_its_query_group(model):
    """Definition: zeroing KV head g's values == zeroing z of every query head h with h // group == g."""
    x = ids()
    layout = AttentionLayout.of(model)
    assert layout.group_size == 2
    for g in range(layout.n_kv_heads):
        kv = head_ablation_study(model, x, build_ablations(layout, ablate_kv=[f"1.{g}"]), patterns=False, progress=False)
        group_heads = [(1, h) for h in range(layout.n_heads) if h // layout.group_size == g]
        expected = reference_ablated_logits(model, x, group_heads)
        with head_ablation_hooks(model, [kv.ablations[0]] * 2, x.shape[1]), torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert kv.table.loc[0, "n_heads_ablated"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(ablate=["3.0"]), "layer 3 out of range"),
    (dict(ablate=["0.4"]), "head 4 out of range"),
    (dict(ablate=["0-1"]), "malformed head spec"),
    (dict(ablate_kv=["0.2"]), "kv head 2 out of range"),
    (dict(ablate_kv=["0.1"], positions=[1]), "--positions cannot be combined"),
    (dict(ablate=["0.1"], positions=[40]), "position 40 out of range"),
    (dict(), "nothing to ablate"),
])
def test_bad_input_is_one_clear_error(kwargs, message):
    model = tiny("qwen3")
    with pytest.raises(UserInputError, match=message):
        run_head_ablation(model, ids(), patterns=False, progress=False, **kwargs)


def test_qwen3_vl_text_decoder_sweep_matches_plain_pre_hook():
    """Qwen3-VL keeps its text layers at model.model.language_model.layers (text-only input here)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                           out_hidden_size=32, deepstack_visual_indexes=[0, 1]),
        attn_implementation="eager")
    model = Qwen3VLForConditionalGeneration(config).eval()
    x = ids()
    result = head_ablation_study(model, x, build_ablations(AttentionLayout.of(model), sweep=True), batch_size=4,
                                 patterns=False, progress=False)
    layer, head = 1, 3
    handle = model.model.language_model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: (torch.cat([a[0][..., :head * 8], torch.zeros_like(a[0][..., head * 8:]) ], -1),))
    with torch.no_grad():
        expected = model(x).logits
    handle.remove()
    with torch.no_grad():
        base = model(x).logits
    got = result.table.set_index("ablation").loc["L1.H3", "kl_divergence"]
    assert got == pytest.approx(float(hand_kl(base, expected)), rel=1e-3)
    # at the last positions only: the sweep runs positions 6.. with the baseline's keys/values (MRoPE ids sliced)
    late = build_ablations(AttentionLayout.of(model), sweep=True, positions=[6, 8])
    fast = head_ablation_study(model, x, late, batch_size=4, patterns=False, progress=False)
    slow = head_ablation_study(model, x, late, batch_size=1, patterns=False, progress=False, reuse_prefix=False)
    torch.testing.assert_close(torch.tensor(fast.table["kl_divergence"].to_numpy()),
                               torch.tensor(slow.table["kl_divergence"].to_numpy()), rtol=1e-4, atol=1e-9)
