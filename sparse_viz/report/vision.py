"""Spatial heatmaps of vision-token masking: each image token's impact drawn over its image.

From the long-format masking rows (with `image_index, grid_row, grid_col`, see
`analysis.vision_masking`) `impact_grids` builds, per image, step, variant and metric, an array
(n_layers, grid_rows, grid_cols); the "all layers" aggregate is the mean over the analysed
layers. Outputs, written into a run's directory:

    vision_token_map.json                  ranges, grid and pixel size of each image
    heatmaps/image{i}_layer{L}.png         matplotlib overlay per layer (step 0, Full, L2)
    heatmaps/image{i}_all_layers.png       the aggregate
    vision_report.html                     the image(s) with a D3 overlay, layer slider (with
                                           "all layers"), metric / variant / step toggles

The images are embedded as data: URI PNGs (the resized image the model saw), so the report is
one self-contained file; token strings and the prompt reach the page only as JSON data.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparse_viz.report.html import render_report

METRICS = {"l2": "l2_distance", "cosine": "cosine_distance"}
HEATMAP_VARIANTS = ("Full", "Attn")
AGGREGATE_DEFINITION = "mean over the analysed layers of each image token's distance"
SIGNIFICANT_DIGITS = 5


def impact_grids(results: pd.DataFrame, token_map: dict) -> dict:
    """Per image: {(step, variant, metric): (L, rows, cols) float array (NaN where not analysed)}.

    Args:
        results: masking rows with image_index, grid_row, grid_col (image tokens only are used).
        token_map: `VisionTokenMap.to_json()`.

    Returns:
        {"layers": [..], "steps": [..], "images": [{(step, variant, metric): array}, ...]}.
    """
    layers = sorted(int(layer) for layer in results["layer"].unique())
    steps = sorted(int(step) for step in results["generation_step"].unique())
    layer_index = {layer: i for i, layer in enumerate(layers)}
    grids = []
    for image in token_map["images"]:
        rows = results[(results["image_index"] == image["image_index"]) & results["variant"].isin(HEATMAP_VARIANTS)]
        per_image = {}
        for (step, variant), group in rows.groupby(["generation_step", "variant"]):
            li = group["layer"].map(layer_index).to_numpy()
            r, c = group["grid_row"].to_numpy(), group["grid_col"].to_numpy()
            for metric, column in METRICS.items():
                grid = np.full((len(layers), image["grid_rows"], image["grid_cols"]), np.nan)
                grid[li, r, c] = group[column].to_numpy()
                per_image[(int(step), variant, metric)] = grid
        grids.append(per_image)
    return {"layers": layers, "steps": steps, "images": grids}


def aggregate_layers(grid: np.ndarray) -> np.ndarray:
    """(L, rows, cols) -> (rows, cols): mean over layers (NaN where no layer has a value)."""
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(grid).sum(axis=0)
        total = np.nansum(grid, axis=0)
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def image_data_uri(image: Any) -> str:
    """A PIL image as a data:image/png;base64 URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_heatmap_overlays(
    directory: Path, grids: dict, images: list[Any], step: int = 0, variant: str = "Full", metric: str = "l2"
) -> list[Path]:
    """Matplotlib overlays: one PNG per image and layer, plus the all-layers aggregate.

    Returns:
        The written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(directory) / "heatmaps"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (per_image, picture) in enumerate(zip(grids["images"], images)):
        grid = per_image.get((step, variant, metric))
        if grid is None:
            continue
        panels = [(f"layer {layer}", f"layer{layer}", grid[i]) for i, layer in enumerate(grids["layers"])]
        panels.append(("all layers (mean)", "all_layers", aggregate_layers(grid)))
        width, height = picture.size
        for label, stem, values in panels:
            figure, axes = plt.subplots(figsize=(4.2, 4.2 * height / width + 0.4), layout="constrained")
            axes.imshow(np.asarray(picture), extent=(0, width, height, 0))
            shown = axes.imshow(
                np.ma.masked_invalid(values), extent=(0, width, height, 0), cmap="inferno", alpha=0.6,
                interpolation="nearest",
            )
            figure.colorbar(shown, ax=axes, shrink=0.8, label=f"{metric} distance ({variant})")
            axes.set_title(f"image {index}, {label}, step {step}", fontsize=9)
            axes.set_axis_off()
            path = out_dir / f"image{index}_{stem}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
    return written


def _rounded(values: np.ndarray) -> list:
    flat = []
    for value in values.reshape(-1).tolist():
        flat.append(None if not math.isfinite(value) else float(f"{value:.{SIGNIFICANT_DIGITS}g}"))
    return flat


def vision_report_payload(results: pd.DataFrame, metadata: dict, images: list[Any]) -> dict:
    """The JSON the page reads (`SV.data`).

    values[step][variant][metric] is a list over layers of row-major cell lists; aggregate the
    same with one list per image (the mean over layers).
    """
    token_map = metadata["vision"]["token_map"]
    grids = impact_grids(results, token_map)
    payload_images = []
    for image, per_image, picture in zip(token_map["images"], grids["images"], images):
        values: dict = {}
        aggregate: dict = {}
        for (step, variant, metric), grid in per_image.items():
            values.setdefault(str(step), {}).setdefault(variant, {})[metric] = [_rounded(g) for g in grid]
            aggregate.setdefault(str(step), {}).setdefault(variant, {})[metric] = _rounded(aggregate_layers(grid))
        width, height = picture.size
        payload_images.append(
            {
                "index": image["image_index"],
                "src": image_data_uri(picture),
                "width": width,
                "height": height,
                "rows": image["grid_rows"],
                "cols": image["grid_cols"],
                "cell": image["cell_pixels"],
                "start": image["start"],
                "values": values,
                "aggregate": aggregate,
            }
        )
    return {
        "meta": {
            "model": metadata.get("model"),
            "prompt": metadata.get("prompt"),
            "generated_text": metadata.get("generated_text"),
            "mask": metadata["vision"]["mask"],
            "ranges": token_map["ranges"],
            "num_image_tokens": token_map["num_image_tokens"],
        },
        "layers": grids["layers"],
        "steps": grids["steps"],
        "variants": [v for v in HEATMAP_VARIANTS if any(k[1] == v for im in grids["images"] for k in im)],
        "metrics": list(METRICS),
        "definitions": {
            "aggregate": AGGREGATE_DEFINITION,
            "l2": metadata.get("distance_definitions", {}).get("l2_distance", "L2 distance"),
            "cosine": metadata.get("distance_definitions", {}).get("cosine_distance", "cosine distance"),
            "attention": metadata["vision"].get("attention", ""),
        },
        "images": payload_images,
    }


def render_vision_report(directory: Path, results: pd.DataFrame, metadata: dict, images: list[Any]) -> Path:
    """Write `vision_report.html` into `directory`; returns its path."""
    data = vision_report_payload(results, metadata, images)
    return render_report(
        "vision.html.j2", Path(directory) / "vision_report.html", title="Vision token masking", data=data
    )


def write_vision_outputs(directory: Path, results: pd.DataFrame, metadata: dict, report: bool = True) -> None:
    """Token map JSON always; heatmap PNGs and the HTML report when image tokens were masked."""
    directory = Path(directory)
    token_map = metadata["vision"]["token_map"]
    (directory / "vision_token_map.json").write_text(json.dumps(token_map, indent=1), encoding="utf-8")
    images = results.attrs.get("images") or []
    has_image_rows = "image_index" in results.columns and bool((results["image_index"] >= 0).any())
    if not (images and has_image_rows):
        return
    grids = impact_grids(results, token_map)
    plot_heatmap_overlays(directory, grids, images)
    if report:
        render_vision_report(directory, results, metadata, images)
