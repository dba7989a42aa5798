"""On the real SmolLM2-135M: a short warm-up of retrofitted Lightning Indexers lowers their KL to
the frozen model's attention and lifts the attention mass their top-k keeps above the local
window's, on held-out text (Shakespeare's validation plays, never trained on)."""

from __future__ import annotations

import pytest
import torch

from sparse_viz.analysis.sparse_eval.windows import held_out_windows
from sparse_viz.data.corpus import load_corpus
from sparse_viz.pretrained.loading import load_model
from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers
from sparse_viz.pretrained.retrofit_model import RetrofitModel

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]
T, K = 256, 16


def kept_mass(probs: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over queries t >= K of the head-summed, L1-normalised attention on the kept keys.
    probs: (1, H, T, T) dense attention; keep: (1, T, T) bool."""
    p = probs.sum(1) / probs.shape[1]  # (1, T, T), rows sum to 1
    return float((p * keep)[:, K:].sum(-1).mean())


def held_out_mass_and_kl(model: RetrofitModel, windows: torch.Tensor) -> tuple[float, float, float]:
    """(indexer top-K mass, local-window mass, mean indexer KL) over layers and windows, brute force
    from the traces' full matrices."""
    t = torch.arange(T)
    causal = t[None, :] <= t[:, None]  # (T, T)
    local = causal & (t[None, :] > t[:, None] - K)  # (T, T): the last K keys
    indexer_mass, local_mass, kls = [], [], []
    with torch.no_grad():
        for window in windows:
            out = model(window[None], attention="dense", indexer_loss="all", trace="full")
            kls.append(float(out.indexer_kl.mean()))
            for trace in out.traces:
                top = trace.index_scores.topk(K, dim=-1).indices  # (1, T, K); rows t < K, not counted, pick future keys
                keep = torch.zeros(1, T, T, dtype=torch.bool).scatter_(-1, top, True) & causal
                indexer_mass.append(kept_mass(trace.dense_attn_probs, keep))
                local_mass.append(kept_mass(trace.dense_attn_probs, local[None]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(indexer_mass), mean(local_mass), mean(kls)


def test_a_short_warmup_beats_the_local_window_on_held_out_text(smollm2_dir):
    torch.manual_seed(0)
    loaded = load_model(smollm2_dir, device="cpu", attn_implementation="sdpa")
    indexers = RetrofitIndexers.for_model(loaded.adapter, heads=4, dim=32, rope_dim=16)
    model = RetrofitModel(loaded.model, indexers, top_k=K)
    for parameter in model.main_parameters():
        parameter.requires_grad_(False)
    held_out, _ = held_out_windows(loaded.tokenizer, "shakespeare", n_windows=2, seq_len=T)
    train_text = "\n".join(d.text for d in load_corpus("shakespeare", 0.1).train[:2])
    train_ids = torch.tensor(loaded.tokenizer(train_text)["input_ids"][: 24 * T]).view(24, T)

    mass_before, local_mass, kl_before = held_out_mass_and_kl(model, held_out)
    optimizer = torch.optim.AdamW(indexers.parameters(), lr=3e-3)
    for window in train_ids:
        kl = model(window[None], attention="dense", indexer_loss="all").indexer_kl.sum()
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
    mass_after, _, kl_after = held_out_mass_and_kl(model, held_out)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    assert mass_after > mass_before, (mass_before, mass_after)
    assert mass_after > local_mass, (mass_after, local_mass)
