"""Component ablation: SVD factors, loaded SPD-style factors, and the three modes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama, tiny_qwen3

from sparse_viz.analysis.ablation.components import (
    component_ablation_study,
    run_component_ablation,
)
from sparse_viz.analysis.ablation.decomposition import (
    component_masks,
    load_factors,
    svd_decomposition,
)
from sparse_viz.analysis.ablation.metrics import kl_per_position
from sparse_viz.errors import UserInputError

PATHS = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


@pytest.fixture(params=["qwen3", "llama"])
def model(request):
    return (tiny_qwen3 if request.param == "qwen3" else tiny_llama)()[0]


def ids(n=2, t=8, vocab=200):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def test_svd_components_reconstruct_every_projection(model):
    dec = svd_decomposition(model, PATHS)
    for path in PATHS:
        W = model.get_submodule(path).weight
        f = dec[path]
        assert f.n_components == min(W.shape)
        torch.testing.assert_close(f.weight(), W, rtol=0, atol=1e-5)
        # rank-1 pieces sum to W (component c = outer(U[c], V[:, c]))
        pieces = sum(torch.outer(f.U[c], f.V[:, c]) for c in range(f.n_components))
        torch.testing.assert_close(pieces, W, rtol=0, atol=1e-5)
        assert dec.relative_error[path] < 1e-6
    assert "SVD baseline" in dec.label


def test_ablating_no_component_changes_nothing(model):
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    dec = svd_decomposition(model, PATHS)
    ones = {p: torch.ones(dec[p].n_components) for p in PATHS}
    with component_masks(model, dec, ones), torch.no_grad():
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=1e-4)
    result = component_ablation_study(model, x, dec, {PATHS[0]: []}, patterns=False, progress=False)
    # fp32 rounding of the SVD reconstruction only (KL ~1e-8), equal to the reported reconstruction error
    assert result.table.loc[0, "kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert result.table.loc[0, "kl_divergence"] == pytest.approx(result.table.loc[0, "reconstruction_kl"], rel=1e-6)
    assert result.table.loc[0, "frac_top1_changed"] == 0.0


def test_ablating_components_equals_editing_the_weight_before_qk_norm_and_rope(model):
    """Reference: a copy of the model whose projection weight loses those rank-1 terms."""
    x = ids()
    for path in PATHS:
        dec = svd_decomposition(model, [path])
        f = dec[path]
        drop = [0, 2]
        reference = copy.deepcopy(model)
        with torch.no_grad():
            W = reference.get_submodule(path).weight
            W -= sum(torch.outer(f.U[c], f.V[:, c]) for c in drop)
            expected = reference(x).logits
        mask = torch.ones(f.n_components)
        mask[drop] = 0
        with component_masks(model, dec, {path: mask}), torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_ablating_all_o_proj_components_zeroes_the_attention_output():
    model = tiny_llama(attention_bias=False)[0]
    x = ids()
    path = "model.layers.0.self_attn.o_proj"
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]))
    with torch.no_grad():
        expected = model(x).logits
    handle.remove()
    table = run_component_ablation(model, x, ["0.o_proj:all"], patterns=False, progress=False)
    dec = svd_decomposition(model, [path])
    with component_masks(model, dec, {path: torch.zeros(dec[path].n_components)}), torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = model(x).logits
    assert table.loc[0, "kl_divergence"] == pytest.approx(float(kl_per_position(base, expected).mean()), rel=1e-4)
    assert table.loc[0, "n_components_ablated"] == 32


def test_adversarial_kl_at_least_deterministic_and_reported_masks_are_used():
    model = tiny_qwen3()[0]
    x = ids()
    dec = svd_decomposition(model, PATHS[2:])
    ablated = {PATHS[3]: [0, 1]}
    det = component_ablation_study(model, x, dec, ablated, mode="deterministic", progress=False)
    adv = component_ablation_study(model, x, dec, ablated, mode="adversarial", ci_default=0.5, pgd_steps=5,
                                   pgd_step_size=0.2, progress=False)
    assert adv.table.loc[0, "kl_divergence"] >= det.table.loc[0, "kl_divergence"]
    assert adv.table.loc[0, "kl_divergence"] > det.table.loc[0, "kl_divergence"] * 1.01  # PGD found something
    assert adv.pgd_history[0] == pytest.approx(det.table.loc[0, "kl_divergence"], rel=1e-5)  # starts at deterministic
    # the reported masks respect the ci constraint and the ablation ...
    m = adv.masks[PATHS[3]]
    assert (m[[0, 1]] == 0).all() and (m >= 0.5 - 1e-6).sum() == len(m) - 2 and (m <= 1).all()
    assert (adv.masks[PATHS[3]] != det.masks[PATHS[3]]).any() or (adv.masks[PATHS[2]] != det.masks[PATHS[2]]).any()
    # ... and ARE what the metrics, patterns and predictions come from: rebuild by editing weights.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        base = model(x, output_attentions=True)
        for path, mask in adv.masks.items():
            f = dec[path]
            reference.get_submodule(path).weight.copy_(((f.V * torch.from_numpy(mask)) @ f.U).T)
        out = reference(x, output_attentions=True)
    assert adv.table.loc[0, "kl_divergence"] == pytest.approx(float(kl_per_position(base.logits, out.logits).mean()), rel=1e-4)
    for layer, pattern in adv.ablated_patterns.items():
        torch.testing.assert_close(torch.from_numpy(pattern), out.attentions[layer], rtol=0, atol=1e-5)
    top = torch.softmax(out.logits[0, -1], -1).topk(5)
    assert [p["id"] for p in adv.predictions[0]["after"]] == top.indices.tolist()
    assert any("ADVERSARIAL MASKS" in n for n in adv.notes)


def test_stochastic_mode_with_ci_one_is_deterministic_and_says_baseline_is_stochastic():
    model = tiny_qwen3()[0]
    x = ids()
    dec = svd_decomposition(model, [PATHS[3]])
    ablated = {PATHS[3]: [0]}
    det = component_ablation_study(model, x, dec, ablated, patterns=False, progress=False)
    sto1 = component_ablation_study(model, x, dec, ablated, mode="stochastic", n_samples=3, ci_default=1.0, patterns=False, progress=False)
    # ci = 1 for the kept components: the only randomness is the ablated component's mask u
    assert sto1.table.loc[0, "kl_divergence"] < det.table.loc[0, "kl_divergence"]
    sto = component_ablation_study(model, x, dec, ablated, mode="stochastic", n_samples=4, ci_default=0.3, patterns=True, progress=False)
    assert sto.table.loc[0, "reconstruction_kl"] > 0  # the stochastic baseline differs from the model
    assert any("BASELINE IS STOCHASTIC TOO" in n for n in sto.notes)
    assert sto.baseline_patterns[0].shape == (2, 4, 8, 8)


def test_loaded_spd_style_factors(tmp_path, model):
    path = PATHS[0]
    W = model.get_submodule(path).weight.detach()
    d_out, d_in = W.shape
    C = 40  # more components than the rank: SPD is over-complete
    torch.manual_seed(0)
    V = torch.randn(d_in, C)
    U = torch.linalg.lstsq(V, W.T).solution if False else torch.linalg.pinv(V) @ W.T  # (C, d_out): V @ U = W^T
    dashed = "components." + path.replace(".", "-")
    save_file({f"{dashed}.V": V.contiguous(), f"{dashed}.U": U.contiguous(), f"{dashed}.ci": torch.full((C,), 0.5)}, tmp_path / "f.safetensors")
    dec = load_factors(tmp_path / "f.safetensors", model)
    assert list(dec.factors) == [path] and dec[path].n_components == C
    assert dec.relative_error[path] < 1e-4
    table = run_component_ablation(model, ids(), ["1.q_proj:3,39"], decomposition=str(tmp_path / "f.safetensors"),
                                   patterns=False, progress=False)
    assert table.loc[0, "n_components_ablated"] == 2
    with pytest.raises(UserInputError, match="component 40 out of range|outside 0-39"):
        run_component_ablation(model, ids(), ["1.q_proj:40"], decomposition=str(tmp_path / "f.safetensors"), progress=False)


def test_stochastic_baseline_and_ablated_runs_share_each_samples_noise():
    """Paired sampling, by a case computable by hand: with nothing ablated, the ablated run's mask
    ci + (1 - ci) u equals the baseline's whenever both use the same u, so every sample's KL is
    exactly 0. A run that drew its own u for the ablated side would show a KL of the noise."""
    model = tiny_qwen3()[0]
    dec = svd_decomposition(model, PATHS)
    result = component_ablation_study(model, ids(), dec, {PATHS[3]: []}, mode="stochastic", n_samples=3,
                                      ci_default=0.3, patterns=False, progress=False)
    assert result.table.loc[0, "kl_divergence"] == 0.0
    assert result.table.loc[0, "kl_std_over_samples"] == 0.0
    assert result.table.loc[0, "frac_top1_changed"] == 0.0
    # ... while the noise itself is real: the stochastic baseline is away from the original model
    assert result.table.loc[0, "reconstruction_kl"] > 1e-4


def test_causal_importances_in_a_factor_file_are_read_and_bound_the_adversarial_masks(tmp_path):
    """ci values written to the file come back from `load_factors`, and the adversarial masks obey
    ci <= mask <= 1 per component with them (ci_default = 1 would pin every mask at 1)."""
    model = tiny_qwen3()[0]
    path = PATHS[3]
    f_svd = svd_decomposition(model, [path])[path]
    C = f_svd.n_components
    ci = torch.linspace(0.0, 1.0, C)
    dashed = "components." + path.replace(".", "-")
    save_file({f"{dashed}.V": f_svd.V.contiguous(), f"{dashed}.U": f_svd.U.contiguous(), f"{dashed}.ci": ci},
              tmp_path / "f.safetensors")
    dec = load_factors(tmp_path / "f.safetensors", model)
    torch.testing.assert_close(dec[path].ci.float(), ci)
    result = component_ablation_study(model, ids(), dec, {path: [0]}, mode="adversarial", ci_default=1.0,
                                      pgd_steps=4, pgd_step_size=0.5, patterns=False, progress=False)
    mask = torch.from_numpy(result.masks[path])
    assert mask[0] == 0  # the ablated component
    kept = torch.arange(1, C)
    assert (mask[kept] >= ci[kept] - 1e-6).all() and (mask[kept] <= 1).all()
    assert mask[-1] == 1.0  # ci = 1: nothing to vary
    assert (mask[kept] < 1 - 1e-3).any()  # PGD used the room the file's ci values give


@pytest.mark.parametrize("tensors, message", [
    ({"model.layers.0.self_attn.q_proj.V": torch.zeros(31, 4), "model.layers.0.self_attn.q_proj.U": torch.zeros(4, 32)}, r"V has shape \(31, 4\), expected \(32, C\)"),
    ({"model.layers.0.self_attn.q_proj.V": torch.zeros(32, 4), "model.layers.0.self_attn.q_proj.U": torch.zeros(4, 30)}, r"U has shape \(4, 30\), expected \(C, 32\)"),
    ({"model.layers.0.self_attn.q_proj.V": torch.zeros(32, 4), "model.layers.0.self_attn.q_proj.U": torch.zeros(5, 32)}, "V has 4 components but U has 5"),
    ({"model.layers.0.self_attn.q_proj.V": torch.zeros(32, 4)}, "needs both V and U"),
    ({"model.layers.9.self_attn.q_proj.V": torch.zeros(32, 4), "model.layers.9.self_attn.q_proj.U": torch.zeros(4, 32)}, "no module"),
    ({"weights": torch.zeros(3)}, "has no '<module>.V'"),
])
def test_mismatched_factor_files_are_one_clear_error(tmp_path, tensors, message):
    model = tiny_qwen3()[0]
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserInputError, match=message):
        load_factors(tmp_path / "bad.safetensors", model)


@pytest.mark.parametrize("spec, message", [
    ("0.q_proj:32", "outside 0-31"),
    ("5.q_proj:0", "layer 5 out of range"),
    ("0.x_proj:0", "no module"),
    ("0.q_proj", "malformed component spec"),
])
def test_bad_component_specs(spec, message):
    model = tiny_qwen3()[0]
    with pytest.raises(UserInputError, match=message):
        run_component_ablation(model, ids(), [spec], progress=False)


# -- padding ----------------------------------------------------------------------------------


def padded_batch(lengths=(8, 5)):
    """Two sequences of different lengths, right-padded, and each one alone."""
    alone = [torch.randint(3, 200, (1, t), generator=torch.Generator().manual_seed(10 + t)) for t in lengths]
    T = max(lengths)
    ids_ = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for n, x in enumerate(alone):
        ids_[n, : x.shape[1]], mask[n, : x.shape[1]] = x[0], 1
    return ids_, mask, alone


def test_padded_prompts_equal_each_sequence_alone(model):
    """Right padding changes nothing: per-position KL of each sequence == that sequence run alone."""
    x, mask, alone = padded_batch()
    dec = svd_decomposition(model, PATHS)
    ablated = {PATHS[1]: [0, 1], PATHS[3]: [2]}
    options = dict(mode="deterministic", patterns=False, progress=False)
    padded = component_ablation_study(model, x, dec, ablated, attention_mask=mask, **options)
    singles = [component_ablation_study(model, a, dec, ablated, **options) for a in alone]
    for n, single in enumerate(singles):
        t = alone[n].shape[1]
        torch.testing.assert_close(torch.from_numpy(padded.kl_per_position[n, :t]),
                                   torch.from_numpy(single.kl_per_position[0]), rtol=1e-4, atol=1e-7)
        assert padded.kl_per_position[n, t:].size == 0 or torch.isnan(torch.from_numpy(padded.kl_per_position[n, t:])).all()
        assert len(padded.tokens[n]) == t
    every_position = torch.cat([torch.from_numpy(s.kl_per_position[0]) for s in singles])
    assert padded.table.loc[0, "kl_divergence"] == pytest.approx(float(every_position.mean()), rel=1e-4)
    assert padded.table.loc[0, "n_positions"] == sum(a.shape[1] for a in alone)


# -- sweeps -----------------------------------------------------------------------------------


def edited_model_logits(model, dec, path, component, x, mask=None):
    """Independent reference: a copy whose decomposed weights are their reconstructions, minus one term."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for p in dec.factors:
            edited.get_submodule(p).weight.copy_(dec[p].weight())
        f = dec[path]
        edited.get_submodule(path).weight -= torch.outer(f.U[component], f.V[:, component])
        return edited(x, attention_mask=mask).logits


@pytest.mark.parametrize("padded", [False, True])
def test_component_sweep_equals_editing_each_weight(model, padded):
    from sparse_viz.analysis.ablation.component_sweep import (
        component_sweep_study,
        sweep_ablations,
    )

    x, mask, _ = padded_batch() if padded else (ids(), None, None)
    dec = svd_decomposition(model, [PATHS[0], "model.layers.0.self_attn.o_proj"])
    ablations = sweep_ablations(model, dec, ["1.q_proj:0-3", "0.o_proj:1,5"])
    assert [a.name for a in ablations] == ["1.q_proj:0", "1.q_proj:1", "1.q_proj:2", "1.q_proj:3", "0.o_proj:1", "0.o_proj:5"]
    result = component_sweep_study(model, x, dec, ablations, attention_mask=mask, batch_size=4, patterns=True, progress=False)
    with torch.no_grad():
        base = model(x, attention_mask=mask).logits.double()
    valid = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask.bool()
    logp = torch.log_softmax(base, -1)
    for i, a in enumerate(ablations):
        logq = torch.log_softmax(edited_model_logits(model, dec, a.path, a.component, x, mask).double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)[valid]  # every real position of every sequence
        row = result.table.iloc[i]
        assert row["kl_divergence"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-8)
        changed = (logp.argmax(-1) != logq.argmax(-1))[valid].double().mean()
        assert row["frac_top1_changed"] == pytest.approx(float(changed))
        assert row["component_norm"] == pytest.approx(float(torch.linalg.svdvals(model.get_submodule(a.path).weight.detach())[a.component]), rel=1e-5)
        assert row["n_positions"] == int(valid.sum())
    # q components change their own layer's attention; o components only later layers'
    assert list(result.ablated_patterns[0]) == [1] and list(result.ablated_patterns[4]) == [1]


def test_batched_component_sweep_equals_one_full_forward_per_component(model):
    from sparse_viz.analysis.ablation.component_sweep import (
        component_sweep_study,
        sweep_ablations,
    )

    x = ids()
    dec = svd_decomposition(model, [PATHS[2], PATHS[3]])
    ablations = sweep_ablations(model, dec, ["1.v_proj:0-2", "1.o_proj:0-2"])
    fast = component_sweep_study(model, x, dec, ablations, batch_size=4, patterns=False, progress=False)
    slow = component_sweep_study(model, x, dec, ablations, batch_size=1, reuse_prefix=False, patterns=False, progress=False)
    for column in ("kl_divergence", "frac_top1_changed", "delta_logprob_top1"):
        torch.testing.assert_close(torch.tensor(fast.table[column].to_numpy()), torch.tensor(slow.table[column].to_numpy()),
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("specs, message", [
    (["1.q_proj:99"], "outside 0-31"),
    (["1.q_proj", "1.q_proj:0"], "listed twice"),
    (["1.x_proj"], "no"),
])
def test_bad_sweep_specs_are_one_clear_error(specs, message):
    from sparse_viz.analysis.ablation.component_sweep import run_component_sweep

    model = tiny_qwen3()[0]
    with pytest.raises(UserInputError, match=message):
        run_component_sweep(model, ids(), specs, patterns=False, progress=False)
