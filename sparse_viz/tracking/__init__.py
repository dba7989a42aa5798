"""What the training callbacks record: selection metrics, the run store, the callback.

The store (`RunStore`) and token types are torch-free and imported eagerly; the metrics and
the callback need torch / Lightning and are imported on first use, so that
`python -m sparse_viz.report RUN_DIR` can read a run without torch.
"""

from __future__ import annotations

from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES

__all__ = ["RunStore", "TOKEN_TYPES", "SelectionAnalysisCallback", "analyse_probe"]


def __getattr__(name: str):
    if name in ("SelectionAnalysisCallback", "analyse_probe"):
        from sparse_viz.tracking import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'sparse_viz.tracking' has no attribute {name!r}")
