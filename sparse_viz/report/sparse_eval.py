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
    """Perplexity vs k (log-log), one line per selector; dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
