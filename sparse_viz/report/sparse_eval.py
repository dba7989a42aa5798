"""Sparse evaluation on disk -> perplexity.png and report.html (no torch needed).

    perplexity.png  perplexity against k, one line per selector, dense as a horizontal line
    report.html     the same chart (interactive), the table, and mass@k / recall@k per layer
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sparse_viz.report.html import render_report
from sparse_viz.report.impact import SELECTOR_COLOURS


def perplexity_figure(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Write perplexity.png (`perplexity_plot`) to `path` and return `path`."""
    import matplotlib.pyplot as plt

    fig = perplexity_plot(table, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def perplexity_plot(table: pd.DataFrame, title: str = ""):
    """Perplexity vs k (log-log), one line per selector; dense as a horizontal line; the legend
    beside the axes, so it never covers a curve.

    Args:
        table: the perplexity table (selector, k, perplexity).
        title: the axes title (default: what the panel shows).

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.2), layout="constrained")
    dense = table[table["selector"] == "dense"]
    for name, rows in table[table["selector"] != "dense"].groupby("selector", sort=False):
        rows = rows.sort_values("k")
        ax.plot(rows["k"], rows["perplexity"], marker="o", label=name, color=SELECTOR_COLOURS.get(name))
    if len(dense):
        ax.axhline(float(dense["perplexity"].iloc[0]), color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k (keys per query)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(title or "Perplexity with each layer attending to k selected keys", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def sparse_eval_payload(table: pd.DataFrame, layers: pd.DataFrame, metadata: dict) -> dict:
    return {
        "table": table.replace({np.nan: None}).to_dict(orient="records"),
        "layers": layers.replace({np.nan: None}).to_dict(orient="records"),
        "model": metadata.get("model", ""),
        "corpus": metadata.get("corpus", ""),
        "definitions": metadata.get("definitions", {}),
        "seq_len": metadata.get("seq_len"),
        "n_windows": metadata.get("n_windows"),
    }


def render_sparse_eval_report(directory: Path, payload: dict, title: str) -> Path:
    return render_report("sparse_eval.html.j2", Path(directory) / "report.html", title=title, data=payload)
