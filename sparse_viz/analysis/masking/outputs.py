"""Masking results on disk: masking_results.csv/.json, metadata.json and report.html, atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from sparse_viz.output_dir import write_output_dir
from sparse_viz.report.masking import (  # columns defined once there
    RESULT_COLUMNS,
    render_masking_report,
)

# Written after RESULT_COLUMNS when present (vision-language runs, `masking.vision`).
OPTIONAL_COLUMNS = ("token_kind", "image_index", "grid_row", "grid_col")


def results_to_json(results: pd.DataFrame) -> dict:
    """Columnar JSON of the long-format rows: {"columns": {name: [values...]}, "num_rows": N}."""
    columns = {}
    for name in _output_columns(results):
        values = results[name].tolist()
        if name.endswith("_distance") or name in OPTIONAL_COLUMNS:
            values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        columns[name] = values
    return {"format": "columnar", "num_rows": len(results), "columns": columns}


def _output_columns(results: pd.DataFrame) -> list[str]:
    return list(RESULT_COLUMNS) + [name for name in OPTIONAL_COLUMNS if name in results.columns]


def write_masking_outputs(
    output_dir: str | os.PathLike,
    results: pd.DataFrame,
    metadata: dict,
    report: bool = True,
    extra_outputs: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write masking_results.csv/.json, metadata.json and report.html into `output_dir`.

    `extra_outputs(staging_dir)`, when given, writes further files (heatmaps, vision report)
    into the same staging directory, so they are moved in atomically with the rest.

    Everything is written into a temp dir beside `output_dir` and moved in at the end, so a
    failure leaves no half-written output. `output_dir` must be new or empty, or an earlier
    result of this project replaced with `overwrite` (`sparse_viz.output_dir`).

    Returns:
        The output directory.

    Raises:
        UserInputError: the output location cannot be written, or holds something else.
    """
    with write_output_dir(output_dir, written_by="write_masking_outputs", overwrite=overwrite) as staging:
        results.loc[:, _output_columns(results)].to_csv(staging / "masking_results.csv", index=False)
        (staging / "masking_results.json").write_text(
            json.dumps(results_to_json(results), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        (staging / "metadata.json").write_text(
            json.dumps(metadata, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
        )
        if report:
            render_masking_report(staging, results, metadata)
        if extra_outputs is not None:
            extra_outputs(staging)
    return Path(output_dir)
