"""Probes of pretrained checkpoints: token masking, head and component ablation.

`python -m sparse_viz.analysis <command>`; the same functions are importable from here.
Heavy modules are imported on first use, so `import sparse_viz.analysis` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_masking_experiment": "sparse_viz.analysis.token_masking",
    "write_masking_outputs": "sparse_viz.analysis.token_masking",
    "load_model": "sparse_viz.analysis.loading",
    "LoadedModel": "sparse_viz.analysis.loading",
    "ArchitectureAdapter": "sparse_viz.analysis.loading",
    "SUPPORTED_ARCHITECTURES": "sparse_viz.analysis.loading",
    "run_head_ablation": "sparse_viz.analysis.head_ablation",
    "run_component_ablation": "sparse_viz.analysis.component_ablation",
    "run_component_sweep": "sparse_viz.analysis.component_ablation",
    "run_vision_masking_experiment": "sparse_viz.analysis.vision_masking",
    "run_batch": "sparse_viz.analysis.batch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
