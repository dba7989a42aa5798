"""Sparse evaluation on disk: perplexity.csv, coverage.csv, metadata.json, perplexity.png and
report.html, written into a staging folder and moved in whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparse_viz.analysis.sparse_eval.evaluation import SparseEvaluation
from sparse_viz.output_dir import write_output_dir
from sparse_viz.report.sparse_eval import perplexity_figure, render_sparse_eval_report, sparse_eval_payload


def write_sparse_eval_outputs(output_dir: str | os.PathLike, result: SparseEvaluation, report: bool = True,
                              overwrite: bool = False) -> Path:
    """Write the evaluation into `output_dir`, whole: a new or empty folder, or an earlier result
    of this project replaced with `overwrite` (`sparse_viz.output_dir`)."""
    with write_output_dir(output_dir, written_by="write_sparse_eval_outputs", overwrite=overwrite) as staging:
        result.table.to_csv(staging / "perplexity.csv", index=False)
        result.layers.to_csv(staging / "coverage.csv", index=False)
        (staging / "metadata.json").write_text(json.dumps(result.metadata, ensure_ascii=False, indent=1, default=str),
                                               encoding="utf-8")
        title = f"Sparse attention on {result.metadata.get('model', '')}"
        perplexity_figure(result.table, staging / "perplexity.png", title=title)
        if report:
            render_sparse_eval_report(staging, sparse_eval_payload(result.table, result.layers, result.metadata), title)
    return Path(output_dir)
