"""analyse_probe on a tiny real SparseTransformer, and `write_synthetic_run`, the run directory
that the plot and report tests render (imported by them from this module)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import selection_reference as ref
import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.selectors import select_keys
from sparse_viz.tracking.callback import (BASELINES, SCORE_BINS, TOP_TOKENS, SelectionAnalysisCallback, analyse_probe,
                                         snapshot_record)
from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES, frequency_classes, token_type_matrix

XSS_TOKEN = "</script><img src=x onerror=alert(1)>"


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, top_k=6,
                  indexer_heads=2, indexer_dim=8, indexer_rope_dim=4)
    fields.update(overrides)
    return ModelConfig(**fields)


def baselines_for(traces, cfg: ModelConfig, k: int, T: int, P: int) -> dict[str, list[torch.Tensor]]:
    return {name: [select_keys(name, top_k=k, seq_len=T, index_scores=tr.index_scores,
                               dense_probs=tr.dense_attn_probs, sink_tokens=min(cfg.sink_tokens, k - 1),
                               seed=0, batch_size=P) for tr in traces] for name in BASELINES}


def write_synthetic_run(run_dir: Path, *, n_snapshots: int = 4, seq_len: int = 24, probe_rows: int = 2,
                        tokens: list[str] | None = None, every: int = 10, n_layers: int = 2,
                        stages: list[str] | None = None) -> Path:
    """A run directory written the way the callback writes it, from a tiny random model whose
    weights drift between snapshots (dense stage first, sparse stage after). `stages` names the
    stage of each snapshot instead (dense attention in every stage but `sparse`)."""
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=n_layers)
    model = SparseTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (probe_rows, seq_len))
    words = tokens or [f" w{i}" if i % 5 else "," for i in range(cfg.vocab_size)]
    strings = [[words[int(i) % len(words)] if tokens is None else tokens[j % len(tokens)]
                for j, i in enumerate(row)] for row in ids]
    frequent, rare = frequency_classes(np.bincount(ids.reshape(-1).numpy(), minlength=cfg.vocab_size))
    types = torch.as_tensor(np.stack([token_type_matrix(s, row.numpy(), frequent, rare) for s, row in zip(strings, ids)]))
    lookup = {int(i): s for row_s, row in zip(strings, ids) for s, i in zip(row_s, row.tolist())}
    store = RunStore(run_dir)
    k = min(cfg.top_k, seq_len)
    store.write_probe({"token_ids": ids[0].tolist(), "tokens": strings[0], "probe_rows": probe_rows,
                       "seq_len": seq_len, "top_k": k, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                       "selector": cfg.selector, "every_n_steps": every, "token_types": [],
                       "run_name": Path(run_dir).name})
    previous = None
    for i in range(n_snapshots):
        if stages is None:
            attention = "dense" if i < n_snapshots // 2 else "sparse"
            stage = attention
        else:
            stage = stages[i]
            attention = "sparse" if stage == "sparse" else "dense"
        with torch.no_grad():
            traces = model(ids, attention=attention, trace="full").traces
            scalars, arrays, selected = analyse_probe(
                traces, k, token_types=types, token_ids=ids, previous_selected=previous,
                baselines=baselines_for(traces, cfg, k, seq_len, probe_rows), attention=attention)
            for p in model.parameters():  # drift, so that snapshots differ
                p.add_(0.05 * torch.randn_like(p))
        previous = selected
        record = snapshot_record(i * every, scalars, arrays, stage=stage,
                                 attention=attention, selected_by_attention=attention == "sparse",
                                 token_lookup=lookup, val_loss=4.0 - 0.3 * i, tokens_per_s=1000.0 + i)
        store.append(record, arrays)
    return Path(run_dir)


@pytest.fixture(scope="module")
def tiny_traces():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SparseTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        return cfg, ids, model(ids, attention="sparse", trace="full").traces


def test_analyse_probe_mass_matches_a_naive_loop(tiny_traces):
    cfg, ids, traces = tiny_traces
    k = cfg.top_k
    scalars, arrays, selected = analyse_probe(traces, k, attention="sparse")
    for layer, trace in enumerate(traces):
        dense = trace.dense_attn_probs  # (B, H, T, T)
        B, H, T, _ = dense.shape
        total, count = 0.0, 0
        for b in range(B):
            for t in range(k, T):  # informative rows t + 1 > k
                keys = [int(s) for s in trace.selected[b, t] if s >= 0]
                total += sum(float(dense[b, h, t, s]) for h in range(H) for s in keys) / H
                count += 1
        assert scalars[f"L{layer}/mass_at_k"] == pytest.approx(total / count, rel=1e-5)
    assert torch.equal(selected[0], traces[0].selected.long())
    assert arrays["show_selected"].shape == (cfg.n_layers, 20, k)


def test_oracle_mass_is_the_maximum_and_random_is_below_it(tiny_traces):
    cfg, ids, traces = tiny_traces
    k = cfg.top_k
    scalars, _, _ = analyse_probe(traces, k, baselines=baselines_for(traces, cfg, k, 20, 2), attention="sparse")
    for layer in range(cfg.n_layers):
        oracle = scalars[f"L{layer}/mass_at_k_oracle"]
        for name in ("mass_at_k", "mass_at_k_random", "mass_at_k_local", "mass_at_k_sink_local"):
            assert scalars[f"L{layer}/{name}"] <= oracle + 1e-6


def test_jaccard_with_itself_is_one(tiny_traces):
    cfg, ids, traces = tiny_traces
    _, _, selected = analyse_probe(traces, cfg.top_k, attention="sparse")
    scalars, _, _ = analyse_probe(traces, cfg.top_k, previous_selected=selected, attention="sparse")
    assert scalars["jaccard_prev"] == pytest.approx(1.0)


def test_dense_stage_uses_the_indexers_would_be_selection(tiny_traces):
    """While attention is dense, the selection is the indexer's top-k over the visible keys:
    for every query, the selected keys' scores are the k largest of I[t, :t+1] (compared by
    value, so that tied scores, e.g. keys every ReLU zeroes, may come in any order)."""
    cfg, ids, _ = tiny_traces
    torch.manual_seed(0)
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        traces = model(ids, attention="dense", trace="full").traces
    _, arrays, selected = analyse_probe(traces, cfg.top_k, attention="dense")
    for layer, trace in enumerate(traces):
        assert trace.selected is None  # the attention selected nothing: the indexer's choice is shown
        scores = trace.index_scores.tolist()
        for b, rows in enumerate(selected[layer].tolist()):
            for t, row in enumerate(rows):
                keys = [s for s in row if s >= 0]
                assert len(set(keys)) == len(keys) == min(cfg.top_k, t + 1) and max(keys) <= t
                best = sorted(scores[b][t][: t + 1], reverse=True)[: cfg.top_k]
                assert sorted((scores[b][t][s] for s in keys), reverse=True) == best
    assert arrays["show_attn"].shape == arrays["show_dense"].shape


def test_synthetic_run_has_one_line_and_one_npz_per_snapshot(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_snapshots=3)
    store = RunStore(run)
    assert store.steps() == [0, 10, 20]
    assert all(store.snapshot_path(s).is_file() for s in (0, 10, 20))
    history = store.read_history()
    assert history[0]["stage"] == "dense" and history[-1]["selection_source"] == "attention"
    assert "jaccard_prev" not in history[0] or history[0]["jaccard_prev"] is None
    assert 0.0 <= history[1]["jaccard_prev"] <= 1.0
    assert math.isfinite(history[-1]["mass_at_k_oracle"])


# ---------------------------------------------------------------------------- against brute-force loops
# Every scalar and array of one `analyse_probe` call on a real tiny model's traces (2 probe rows,
# 2 layers, 2 heads, sparse stage) is recomputed by the loops of `selection_reference.py`,
# which share no code with `sparse_viz.tracking`.
def random_types(P: int, T: int, seed: int = 1) -> torch.Tensor:
    """(P, T, n_types) random token types: every column mixes True and False in each row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(P, T, len(TOKEN_TYPES), generator=generator) < torch.linspace(0.15, 0.7, len(TOKEN_TYPES))


def random_previous(n_layers: int, P: int, T: int, k: int, seed: int = 2) -> torch.Tensor:
    """(L, P, T, k) a different random visible selection per layer (-1 pads short rows)."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.full((n_layers, P, T, k), -1, dtype=torch.long)
    for layer in range(n_layers):
        for b in range(P):
            for t in range(T):
                n = min(k, t + 1)
                out[layer, b, t, :n] = torch.randperm(t + 1, generator=generator)[:n]
    return out


@pytest.fixture(scope="module")
def probe_analysis(tiny_traces):
    cfg, ids, traces = tiny_traces
    P, T = ids.shape
    k = cfg.top_k
    types = random_types(P, T)
    previous = random_previous(cfg.n_layers, P, T, k)
    baselines = baselines_for(traces, cfg, k, T, P)
    scalars, arrays, selected = analyse_probe(traces, k, token_types=types, token_ids=ids,
                                              previous_selected=previous, baselines=baselines,
                                              attention="sparse")
    return {"cfg": cfg, "ids": ids, "traces": traces, "k": k, "P": P, "T": T, "types": types,
            "previous": previous, "baselines": baselines, "scalars": scalars, "arrays": arrays}


def each_layer(probe_analysis):
    """(layer, dense probs, selection, trace) as nested lists, for the reference loops."""
    for layer, trace in enumerate(probe_analysis["traces"]):
        yield layer, trace.dense_attn_probs.tolist(), trace.selected.tolist(), trace


def test_recall_at_k_matches_a_loop_over_informative_queries(probe_analysis):
    P, T, k, scalars = probe_analysis["P"], probe_analysis["T"], probe_analysis["k"], probe_analysis["scalars"]
    per_layer = []
    for layer, probs, sel, _ in each_layer(probe_analysis):
        expected = ref.mean_over_informative(lambda b, t: ref.recall_at_k(probs, sel, b, t, k), P, T, k)
        assert scalars[f"L{layer}/recall_at_k"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 < expected < 1.0  # the random model's selection is neither perfect nor disjoint
        per_layer.append(expected)
    assert scalars["recall_at_k"] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-6)


def test_entropies_match_a_loop_over_rows_of_the_attention_used_and_the_dense_one(probe_analysis):
    scalars = probe_analysis["scalars"]
    for layer, probs, _, trace in each_layer(probe_analysis):
        assert scalars[f"L{layer}/entropy_dense"] == pytest.approx(ref.mean_entropy(probs), rel=1e-5)
        assert scalars[f"L{layer}/entropy_sparse"] == pytest.approx(ref.mean_entropy(trace.attn_probs.tolist()), rel=1e-5)
        # sparse rows spread over at most k keys: less entropy than the dense rows
        assert scalars[f"L{layer}/entropy_sparse"] < scalars[f"L{layer}/entropy_dense"]


def test_token_type_shares_match_a_counting_loop(probe_analysis):
    """type_share[j]: share of the informative rows' selections whose KEY has type j;
    type_base[j]: share of the keys visible to informative rows that have type j."""
    k, arrays, types = probe_analysis["k"], probe_analysis["arrays"], probe_analysis["types"].tolist()
    for layer, _, sel, _ in each_layer(probe_analysis):
        share, base = ref.type_shares(sel, types, k)
        assert arrays["type_share"][layer].tolist() == pytest.approx(share, rel=1e-5)
        assert arrays["type_base"][layer].tolist() == pytest.approx(base, rel=1e-5)


def test_most_selected_tokens_match_a_counting_loop(probe_analysis):
    """top_token_ids / counts: the ids selected most often by informative queries, with how often."""
    k, arrays, ids = probe_analysis["k"], probe_analysis["arrays"], probe_analysis["ids"].tolist()
    for layer, _, sel, _ in each_layer(probe_analysis):
        counts = ref.token_selection_counts(sel, ids, k)
        top_ids = [int(i) for i in arrays["top_token_ids"][layer] if i >= 0]
        top_counts = arrays["top_token_counts"][layer][: len(top_ids)].tolist()
        assert len(top_ids) == min(TOP_TOKENS, len(counts)) == len(set(top_ids))
        assert top_counts == [counts[i] for i in top_ids]  # each id with its own count
        # ... and no id left out selected more often than one kept (ties may go either way)
        assert top_counts == sorted(counts.values(), reverse=True)[: len(top_ids)]


def test_jaccard_with_the_previous_selection_matches_set_arithmetic_layer_by_layer(probe_analysis):
    P, T, k, scalars = probe_analysis["P"], probe_analysis["T"], probe_analysis["k"], probe_analysis["scalars"]
    previous = probe_analysis["previous"].tolist()
    for layer, _, sel, _ in each_layer(probe_analysis):
        expected = ref.mean_over_informative(lambda b, t: ref.jaccard(sel, previous[layer], b, t), P, T, k)
        assert scalars[f"L{layer}/jaccard_prev"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 < expected < 1.0


def test_selection_biases_and_baseline_masses_match_counting_loops(probe_analysis):
    P, T, k = probe_analysis["P"], probe_analysis["T"], probe_analysis["k"]
    scalars, arrays = probe_analysis["scalars"], probe_analysis["arrays"]
    for layer, probs, sel, _ in each_layer(probe_analysis):
        assert scalars[f"L{layer}/sink_share"] == pytest.approx(ref.sink_share(sel, k), rel=1e-6)
        assert scalars[f"L{layer}/local_share"] == pytest.approx(ref.local_share(sel, k, k), rel=1e-6)
        assert arrays["pos_freq"][layer].tolist() == pytest.approx(ref.frequency_by_position(sel, k), rel=1e-5)
        assert arrays["dist_freq"][layer].tolist() == pytest.approx(ref.frequency_by_distance(sel, k), rel=1e-5)
        for name, per_layer in probe_analysis["baselines"].items():
            chosen = per_layer[layer].tolist()
            expected = ref.mean_over_informative(lambda b, t: ref.mass_at_k(probs, chosen, b, t), P, T, k)
            assert scalars[f"L{layer}/mass_at_k_{name}"] == pytest.approx(expected, rel=1e-5), name


def test_indexer_scalars_and_arrays_match_loops(probe_analysis):
    """KL (mean over every query), score statistics and histogram, head specialisation."""
    P, T, arrays, scalars = probe_analysis["P"], probe_analysis["T"], probe_analysis["arrays"], probe_analysis["scalars"]
    for layer, probs, _, trace in each_layer(probe_analysis):
        scores = trace.index_scores.tolist()
        kl = [ref.indexer_kl(probs, scores, b, t) for b in range(P) for t in range(T)]
        # float32 KL of a near-uniform random indexer is ~5e-5: compare to float32 accuracy
        assert scalars[f"L{layer}/indexer_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-8)
        stats = ref.score_statistics(scores, bins=SCORE_BINS)
        for key in ("mean", "std", "min", "max"):
            assert scalars[f"L{layer}/score_{key}"] == pytest.approx(stats[key], rel=1e-5)
        assert arrays["score_hist"][layer].tolist() == stats["hist"]
        assert arrays["score_edges"][layer].tolist() == pytest.approx(stats["edges"], rel=1e-5, abs=1e-6)
        heads = ref.head_specialisation(trace.index_head_terms.tolist())
        assert arrays["head_share"][layer].tolist() == pytest.approx(heads["weight_share"], rel=1e-4)
        assert arrays["head_spec"][layer].tolist() == pytest.approx(heads["specialisation"], rel=1e-4)
        assert scalars[f"L{layer}/head_redundancy"] == pytest.approx(heads["redundancy"], abs=1e-4)


def test_head_features_are_each_heads_distance_profile(probe_analysis):
    arrays, T = probe_analysis["arrays"], probe_analysis["T"]
    buckets = T.bit_length()  # floor(log2 T) + 1
    for layer, probs, _, _ in each_layer(probe_analysis):
        np.testing.assert_allclose(arrays["head_features"][layer], ref.head_distance_profile(probs, buckets), atol=1e-5)


def test_probe_row_zero_views_match_the_traces(probe_analysis):
    """The show_* arrays of the report: per query of probe row 0, each selected slot's dense p,
    attention used, indexer score; the dense top-k keys; the row's mass@k."""
    k, arrays = probe_analysis["k"], probe_analysis["arrays"]
    for layer, probs, sel, trace in each_layer(probe_analysis):
        used, scores = trace.attn_probs.tolist(), trace.index_scores.tolist()
        assert arrays["show_selected"][layer].tolist() == sel[0]
        for t, row in enumerate(sel[0]):
            for slot, s in enumerate(row):
                if s < 0:
                    assert np.isnan(arrays["show_dense"][layer, t, slot]) and np.isnan(arrays["show_score"][layer, t, slot])
                    continue
                assert arrays["show_dense"][layer, t, slot] == pytest.approx(ref.head_mean(probs, 0, t, s), rel=1e-5)
                assert arrays["show_attn"][layer, t, slot] == pytest.approx(ref.head_mean(used, 0, t, s), rel=1e-5, abs=1e-7)
                assert arrays["show_score"][layer, t, slot] == pytest.approx(scores[0][t][s], rel=1e-5)
            assert arrays["show_mass"][layer, t] == pytest.approx(ref.mass_at_k(probs, sel, 0, t), rel=1e-5)
            top = {int(s) for s in arrays["show_dense_top"][layer, t] if s >= 0}
            assert top == ref.dense_top_keys(probs, 0, t, k)


def test_snapshot_record_lists_the_most_selected_tokens_by_text(probe_analysis):
    arrays = probe_analysis["arrays"]
    lookup = {int(i): f"tok{i}" for i in probe_analysis["ids"].reshape(-1).tolist()}
    record = snapshot_record(30, probe_analysis["scalars"], arrays, stage="sparse", attention="sparse",
                             selected_by_attention=True, token_lookup=lookup)
    assert record["step"] == 30 and record["selection_source"] == "attention"
    for layer, listed in enumerate(record["top_tokens"]):
        kept = [(int(i), int(c)) for i, c in zip(arrays["top_token_ids"][layer], arrays["top_token_counts"][layer]) if i >= 0]
        assert listed == [[f"tok{i}", c] for i, c in kept]


def test_callback_baselines_are_the_selectors_they_are_named_after(tiny_traces):
    """The selections whose mass@k the callback records as baselines, key set by key set:
    oracle = the dense top-k keys, local = the last k visible keys, sink_local = the first
    sink_tokens keys + the most recent ones, random = k distinct visible keys; sink_local is left
    out when sink_tokens does not fit in k."""
    cfg, ids, traces = tiny_traces
    P, T = ids.shape
    k = cfg.top_k
    baselines = SelectionAnalysisCallback()._baselines(traces, cfg, k, T, P, "cpu")
    assert set(baselines) == set(BASELINES)
    sink = cfg.sink_tokens
    assert 0 < sink < k
    for layer, trace in enumerate(traces):
        probs = trace.dense_attn_probs.tolist()
        for b in range(P):
            for t in range(T):
                n = min(k, t + 1)
                chosen = {name: ref.keys_of(per_layer[layer][b, t].tolist()) for name, per_layer in baselines.items()}
                assert chosen["oracle"] == ref.dense_top_keys(probs, b, t, k)
                assert chosen["local"] == set(range(t + 1 - n, t + 1))
                expected = set(range(t + 1)) if t + 1 <= k else set(range(sink)) | set(range(t + 1 - (k - sink), t + 1))
                assert chosen["sink_local"] == expected
                assert len(chosen["random"]) == n and max(chosen["random"]) <= t
    too_many_sinks = SelectionAnalysisCallback()._baselines(traces, dataclasses.replace(cfg, sink_tokens=k), k, T, P, "cpu")
    assert "sink_local" not in too_many_sinks and set(too_many_sinks) == set(BASELINES) - {"sink_local"}
