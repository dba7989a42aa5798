"""Impact analysis on disk -> agreement.png and report.html (no torch needed).

    agreement.png   impact-recall@k per layer, one line per selector, one panel per k
    report.html     a layer's impact matrix (hover a query: its impact row beside the attention
                    mass, with the top-k of each marked) and the agreement table
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparse_viz.report.html import render_report

SELECTOR_COLOURS = {"attention_mass": "#1f77b4", "indexer": "#d62728", "local": "#2ca02c",
                    "sink_local": "#9467bd", "random": "#7f7f7f"}
MAX_REPORT_LAYERS = 6  # each embedded layer is two lower-triangular T x T matrices


def agreement_figure(agreement: pd.DataFrame, path: Path) -> Path:
    """Write agreement.png (`agreement_plot`) to `path` and return `path`."""
    import matplotlib.pyplot as plt

    fig = agreement_plot(agreement)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def agreement_plot(agreement: pd.DataFrame):
    """impact-recall@k against layer, one line per selector, one panel per k.

    The selectors' legend sits right of the panels (never on a line); with no agreement rows
    (every query sees at most k keys, so every selection is the whole row) the one panel says so.

    Args:
        agreement: the agreement table (layer, selector, k, impact_recall_at_k, ...).

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(agreement["k"].unique())
    fig, axes = plt.subplots(1, max(len(ks), 1), figsize=(4.2 * max(len(ks), 1) + 1.6, 3.6), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, k in zip(axes[0], ks):
        part = agreement[agreement["k"] == k]
        for name, rows in part.groupby("selector", sort=False):
            rows = rows.sort_values("layer")
            ax.plot(rows["layer"], rows["impact_recall_at_k"], marker="o", ms=3, label=name,
                    color=SELECTOR_COLOURS.get(name))
        ax.set_title(f"k = {k}")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("impact-recall@k (mean over queries)")
    if not ks:
        axes[0][0].text(0.5, 0.5, "no query sees more than k keys for any k given:\nevery selection keeps the whole row, "
                        "nothing to compare\n(a longer prompt or a smaller --k)", ha="center", va="center",
                        transform=axes[0][0].transAxes, color="#667085")
        axes[0][0].set_xticks([])
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, title="selector")
    fig.suptitle("Share of each query's k highest-impact keys that a selection keeps", fontsize=10)
    return fig


def report_layers(layers: list[int], wanted: list[int] | None = None) -> list[int]:
    """The layers embedded in the HTML: `wanted` if given, else up to MAX_REPORT_LAYERS spread out."""
    if wanted:
        return [layer for layer in layers if layer in set(wanted)]
    if len(layers) <= MAX_REPORT_LAYERS:
        return list(layers)
    picks = np.linspace(0, len(layers) - 1, MAX_REPORT_LAYERS).round().astype(int)
    return [layers[i] for i in sorted(set(picks.tolist()))]


def _lower_rows(matrix: np.ndarray, digits: int = 4) -> list[list[float | None]]:
    """Row t as its t + 1 causal entries, rounded; NaN -> None."""
    return [[None if not np.isfinite(x) else float(f"{x:.{digits}g}") for x in matrix[t, : t + 1]]
            for t in range(matrix.shape[0])]


def impact_payload(layers: list[int], tokens: list[str], l2: np.ndarray, attention_mass: np.ndarray,
                   agreement: pd.DataFrame, metadata: dict[str, Any], wanted: list[int] | None = None) -> dict:
    """The report's data: the chosen layers' impact and mass rows, tokens, agreement, metadata."""
    shown = report_layers(layers, wanted)
    index = {layer: i for i, layer in enumerate(layers)}
    return {
        "tokens": tokens,
        "layers": shown,
        "k": metadata.get("k", []),
        "impact": {str(layer): _lower_rows(l2[index[layer]]) for layer in shown},
        "mass": {str(layer): _lower_rows(attention_mass[index[layer]]) for layer in shown},
        "agreement": agreement.replace({np.nan: None}).to_dict(orient="records"),
        "model": metadata.get("model", ""),
        "prompt": metadata.get("prompt", ""),
        "definitions": metadata.get("definitions", {}),
    }


def render_impact_report(directory: Path, payload: dict, title: str = "Attention impact") -> Path:
    """Write report.html into `directory`."""
    return render_report("impact.html.j2", Path(directory) / "report.html", title=title, data=payload)
