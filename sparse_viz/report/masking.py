"""The token-masking report: one HTML file to explore `masking_results` (seed 000's viewer).

The long-format results (one row per generation step x layer x masked position x variant) are
embedded column by column: layer, variant and step as small integer codes into lookup tables,
positions as integers, distances rounded to 5 significant digits. Compared with a list of row
objects this removes the repeated keys and token strings, so 165k rows parse in tens of
milliseconds (see bench/bench_report_load.py). Token text appears once per step and position.

Payload read by `static/masking.js` (`SV.data`):

    meta:      model, prompt, generated_text, num_layers, num_heads, num_rows,
               extra: other scalar metadata (one dict level flattened as `outer.inner`)
    definitions: {variants: {name: text}, metrics: {name: text}} (metrics from
               metadata["distance_definitions"] when given)
    layers:    sorted layer indices                 rows.layer  -> index into it
    variants:  Full, Attn, Head_0..Head_{H-1}, ...  rows.variant -> index into it
    steps:     [{step, positions, masked, sequence, next_token}] rows.step -> index into it
               positions: analysed positions (sorted), masked: token_masked at each of them,
               sequence: the full token list of that step, next_token: the token generated
               from it (both null when not given)
    rows:      {step, layer, position, variant, l2, cosine}: equal-length arrays
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparse_viz.errors import UserInputError
from sparse_viz.report.html import render_report

RESULT_COLUMNS = (
    "generation_step",
    "layer",
    "token_masked",
    "token_position",
    "variant",
    "l2_distance",
    "cosine_distance",
)

METRIC_DEFINITIONS = {
    "L2 distance": "||d_baseline - d_masked||_2 at the final position: how much the "
    "contribution changes in magnitude when the token is masked.",
    "Cosine distance": "1 - cos(d_baseline, d_masked) at the final position: how much the "
    "contribution changes in direction (0 = same direction, 2 = opposite).",
    "Masking": "The key of one token is removed from the final query's attention in one layer "
    "only (its logit set to -inf before softmax, the rest renormalised); every other layer and "
    "query keeps the model's own mask.",
}

SIGNIFICANT_DIGITS = 5
_HEAD_VARIANT = re.compile(r"^Head_(\d+)$")


def _variant_order(name: str) -> tuple[int, int, str]:
    """Full, Attn, Head_0, Head_1, ..., Head_10 (numeric order), then anything else by name."""
    if name == "Full":
        return (0, 0, name)
    if name == "Attn":
        return (1, 0, name)
    match = _HEAD_VARIANT.match(name)
    if match:
        return (2, int(match.group(1)), name)
    return (3, 0, name)


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> list[float | None]:
    """Round to `digits` significant digits for compact JSON; NaN/inf become None.

    Args:
        values: (N,) floats.

    Returns:
        A list of N Python floats whose repr is at most `digits` significant digits, or None.
    """
    out: list[float | None] = []
    for value in np.asarray(values, dtype=np.float64).tolist():
        out.append(float(f"{value:.{digits}g}") if math.isfinite(value) else None)
    return out


def _codes(column: pd.Series, table: list[Any]) -> list[int]:
    lookup = {value: code for code, value in enumerate(table)}
    return [lookup[value] for value in column.tolist()]


def _step_entries(metadata: dict) -> dict[int, dict]:
    """metadata["steps"] by generation step (entries without a step number are ignored)."""
    entries: dict[int, dict] = {}
    for entry in metadata.get("steps") or []:
        if isinstance(entry, dict) and entry.get("generation_step") is not None:
            entries[int(entry["generation_step"])] = entry
    return entries


def _run_details(metadata: dict, known: set[str]) -> dict[str, Any]:
    """Scalar metadata (and scalars one dict deep, as `outer.inner`) for the page's Run panel."""
    details: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in known:
            continue
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        for name, item in inner:
            item = item.item() if isinstance(item, np.generic) else item
            if _is_scalar(item):
                details[str(key) if name is None else f"{key}.{name}"] = item
    return details


def masking_payload(results: pd.DataFrame, metadata: dict) -> dict:
    """The JSON payload of the masking report (format in the module docstring).

    Args:
        results: long-format masking results with the columns of `RESULT_COLUMNS`.
        metadata: model, prompt, tokens, generated_text, num_layers, num_heads,
            variant_definitions, distance_definitions, steps ([{generation_step, tokens,
            next_token}]) and any scalar extras; every key is optional.

    Returns:
        A JSON-able dict.

    Raises:
        UserInputError: missing columns or no rows.
    """
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise UserInputError(f"masking results lack the column(s) {', '.join(missing)}")
    if len(results) == 0:
        raise UserInputError("masking results are empty: nothing to report")

    frame = results.loc[:, list(RESULT_COLUMNS)].copy()
    frame["generation_step"] = frame["generation_step"].astype(int)
    frame["layer"] = frame["layer"].astype(int)
    frame["token_position"] = frame["token_position"].astype(int)
    frame["variant"] = frame["variant"].astype(str)
    frame["token_masked"] = frame["token_masked"].astype(str)
    # Grouped by step and variant, so the page reads each view from a contiguous block.
    frame = frame.sort_values(["generation_step", "variant", "layer", "token_position"], kind="stable")

    layers = sorted(frame["layer"].unique().tolist())
    variants = sorted(frame["variant"].unique().tolist(), key=_variant_order)
    step_ids = sorted(frame["generation_step"].unique().tolist())

    entries = _step_entries(metadata)
    masked_text = frame.drop_duplicates(["generation_step", "token_position"])
    steps = []
    for step in step_ids:
        at_step = masked_text[masked_text["generation_step"] == step].sort_values("token_position")
        entry = entries.get(step, {})
        sequence = entry.get("tokens")
        if sequence is None and step == step_ids[-1]:
            sequence = metadata.get("tokens")
        next_token = entry.get("next_token")
        steps.append(
            {
                "step": step,
                "positions": at_step["token_position"].tolist(),
                "masked": at_step["token_masked"].tolist(),
                "sequence": None if sequence is None else [str(t) for t in sequence],
                "next_token": None if next_token is None else str(next_token),
            }
        )

    variant_definitions = {str(k): str(v) for k, v in (metadata.get("variant_definitions") or {}).items()}
    metric_definitions = {str(k): str(v) for k, v in (metadata.get("distance_definitions") or {}).items()}
    metric_definitions = {**(metric_definitions or METRIC_DEFINITIONS), "Masking": METRIC_DEFINITIONS["Masking"]}
    known = {"model", "prompt", "tokens", "generated_text", "num_layers", "num_heads",
             "variant_definitions", "distance_definitions", "steps"}
    extra = _run_details(metadata, known)
    num_heads = metadata.get("num_heads")
    if num_heads is None:
        num_heads = sum(1 for v in variants if _HEAD_VARIANT.match(v))
    return {
        "meta": {
            "model": str(metadata.get("model", "")),
            "prompt": str(metadata.get("prompt", "")),
            "generated_text": str(metadata.get("generated_text", "")),
            "num_layers": int(metadata.get("num_layers") or len(layers)),
            "num_heads": int(num_heads),
            "num_rows": int(len(frame)),
            "extra": extra,
        },
        "definitions": {"variants": variant_definitions, "metrics": metric_definitions},
        "layers": layers,
        "variants": variants,
        "steps": steps,
        "rows": {
            "step": _codes(frame["generation_step"], step_ids),
            "layer": _codes(frame["layer"], layers),
            "position": frame["token_position"].tolist(),
            "variant": _codes(frame["variant"], variants),
            "l2": round_significant(frame["l2_distance"].to_numpy()),
            "cosine": round_significant(frame["cosine_distance"].to_numpy()),
        },
    }


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def render_masking_report(output_dir: Path, results: pd.DataFrame, metadata: dict) -> Path:
    """Write `output_dir/report.html` (atomically) to explore token-masking results.

    Args:
        output_dir: folder to write into (created if needed).
        results: long-format DataFrame with the columns `generation_step, layer, token_masked,
            token_position, variant, l2_distance, cosine_distance`.
        metadata: see `masking_payload`; token text in it is treated as untrusted.

    Returns:
        The path of the report.

    Raises:
        UserInputError: results without the required columns or rows, or an output folder
            that cannot be written; nothing is written then.
    """
    payload = masking_payload(results, metadata)
    model = payload["meta"]["model"]
    title = f"Token masking: {model}" if model else "Token masking"
    path = Path(output_dir) / "report.html"
    try:
        return render_report("masking.html.j2", path, title=title, data=payload)
    except OSError as error:  # unwritable or impossible output folder: the user's to fix
        raise UserInputError(f"cannot write the masking report to {path}: {error.strerror or error}") from error
