"""Sweeps on CUDA give the CPU's numbers (skipped without a GPU; run by bench/device_checks.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_qwen3

from sparse_viz.analysis.ablation.component_sweep import (
    component_sweep_study,
    sweep_ablations,
)
from sparse_viz.analysis.ablation.decomposition import svd_decomposition
from sparse_viz.analysis.ablation.heads import (
    AttentionLayout,
    build_ablations,
    head_ablation_study,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_head_sweep_on_cuda_equals_cpu():
    cpu = tiny_qwen3()[0]
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, 9:] = 0
    for positions in (None, [8, 11]):
        ablations = build_ablations(AttentionLayout.of(cpu), sweep=True, sweep_layers=True, positions=positions)
        want = head_ablation_study(cpu, x, ablations, attention_mask=mask, batch_size=5, progress=False)
        got = head_ablation_study(gpu, x.cuda(), ablations, attention_mask=mask.cuda(), batch_size=5, progress=False)
        for column in ("kl_divergence", "frac_top1_changed", "delta_logprob_top1"):
            torch.testing.assert_close(torch.tensor(got.table[column].to_numpy()), torch.tensor(want.table[column].to_numpy()),
                                       rtol=1e-3, atol=1e-6)


def test_component_sweep_on_cuda_equals_cpu():
    cpu = tiny_qwen3()[0]
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    tables = []
    for model, ids in ((cpu, x), (gpu, x.cuda())):
        decomposition = svd_decomposition(model, ["model.layers.1.self_attn.o_proj"])
        ablations = sweep_ablations(model, decomposition, ["1.o_proj:0-7"])
        tables.append(component_sweep_study(model, ids, decomposition, ablations, batch_size=3, progress=False).table)
    torch.testing.assert_close(torch.tensor(tables[1]["kl_divergence"].to_numpy()),
                               torch.tensor(tables[0]["kl_divergence"].to_numpy()), rtol=1e-3, atol=1e-6)
