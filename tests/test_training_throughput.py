"""`train/tokens_per_s` is the run's throughput: every process's tokens, not one process's."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from sparse_viz.training import DSALightningModule


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tokens_per_second_counts_the_tokens_of_every_process(world_size, monkeypatch):
    module = DSALightningModule(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16,
                                top_k=4, indexer_heads=1, indexer_dim=8, indexer_rope_dim=4)
    module._trainer = SimpleNamespace(world_size=world_size)  # what Lightning attaches
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    batch = torch.zeros(8, 17, dtype=torch.long)  # 8 sequences of 16 inputs (+1 target) on each process
    module.on_train_batch_start(batch, 0)
    started = module._batch_started_at
    monkeypatch.setattr(time, "perf_counter", lambda: started + 2.0)  # the step took 2 s
    module.on_train_batch_end(None, batch, 0)
    # hand count: 8 x 16 tokens on each of world_size processes, in 2 s
    assert logged["train/tokens_per_s"] == pytest.approx(8 * 16 * world_size / 2.0)
