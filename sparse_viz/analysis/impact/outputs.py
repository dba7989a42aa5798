"""Impact results on disk: impact.npz, agreement.csv, metadata.json, agreement.png, report.html,
written into a staging folder and moved in whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sparse_viz.analysis.impact.experiment import ImpactResult
from sparse_viz.output_dir import write_output_dir
from sparse_viz.report.impact import agreement_figure, impact_payload, render_impact_report


def write_impact_outputs(output_dir: str | os.PathLike, result: ImpactResult, report: bool = True,
                         report_layers: list[int] | None = None, overwrite: bool = False) -> Path:
    """Write the analysis into `output_dir`, whole: a new or empty folder, or an earlier result of
    this project replaced with `overwrite` (`sparse_viz.output_dir`).

    Files: impact.npz (layers, l2, cosine, attention_mass: (L, T, T) float32, token_ids),
    agreement.csv, metadata.json, agreement.png and, with `report`, report.html (the layers
    `report_layers`, default up to six spread over the model).
    """
    with write_output_dir(output_dir, written_by="write_impact_outputs", overwrite=overwrite) as staging:
        np.savez_compressed(staging / "impact.npz", layers=np.asarray(result.layers), l2=result.l2,
                            cosine=result.cosine, attention_mass=result.attention_mass,
                            token_ids=np.asarray(result.metadata.get("token_ids", [])))
        result.agreement.to_csv(staging / "agreement.csv", index=False)
        (staging / "metadata.json").write_text(json.dumps(result.metadata, ensure_ascii=False, indent=1, default=str),
                                               encoding="utf-8")
        agreement_figure(result.agreement, staging / "agreement.png")
        if report:
            payload = impact_payload(result.layers, result.tokens, result.l2, result.attention_mass,
                                     result.agreement, result.metadata, report_layers)
            render_impact_report(staging, payload, title=f"Attention impact: {result.metadata.get('model', '')}")
    return Path(output_dir)
