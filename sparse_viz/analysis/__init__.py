"""Probes of pretrained checkpoints: token masking, head and component ablation.

    masking/      what each key token matters to each layer's update (exact fast path at the final
                  query, all pairs of queries and keys, brute-force references, Qwen3-VL prompts)
    ablation/     what each head or weight component matters to the output (hooks, modes,
                  decompositions, the batched sweep engine, logit-change metrics)
    impact/       all-pairs impact scored against selections of keys (indexer, oracle, baselines)
    batch.py      token masking for a YAML list of prompts, one model load
    cli.py        `python -m sparse_viz.analysis <command>`: every subcommand's options
    index_spec.py, output_dir.py   index specs ("0,3,5-9") and all-or-nothing output folders

Loading a checkpoint and its inputs (adapter, prompts, images) is `sparse_viz.pretrained`.
The functions below are importable from here; heavy modules load on first use, so
`import sparse_viz.analysis` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_masking_experiment": "sparse_viz.analysis.masking.experiment",
    "write_masking_outputs": "sparse_viz.analysis.masking.outputs",
    "load_model": "sparse_viz.pretrained.loading",
    "LoadedModel": "sparse_viz.pretrained.loaded_model",
    "ArchitectureAdapter": "sparse_viz.pretrained.adapter",
    "SUPPORTED_ARCHITECTURES": "sparse_viz.pretrained.adapter",
    "run_head_ablation": "sparse_viz.analysis.ablation.heads",
    "run_component_ablation": "sparse_viz.analysis.ablation.components",
    "run_component_sweep": "sparse_viz.analysis.ablation.component_sweep",
    "run_vision_masking_experiment": "sparse_viz.analysis.masking.vision",
    "run_batch": "sparse_viz.analysis.batch",
    "run_impact_analysis": "sparse_viz.analysis.impact.experiment",
    "write_impact_outputs": "sparse_viz.analysis.impact.outputs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
