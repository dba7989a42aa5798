"""Files of a head- or component-ablation run: CSV, patterns .npz, metadata.json, PNGs and report.html.

Everything is written into a temporary sibling folder and moved into place at the end, so a
failed run never leaves a half-written output folder.

Report payload (read by static/ablation.js):
    kind: "heads" | "components"; n_layers, n_heads; notes: [str]; tokens: [[str]] per sequence
    ablations: [{name, kind, layer, head, kl_divergence, frac_top1_changed, delta_logprob_top1,
                 kl_per_position: [[float]] per sequence, predictions: [...],
                 pattern_layers: [int], patterns: {layer: key} | null}]
    patterns: {key: {shape: [N, H, T, T], data: base64 of uint8 round(255 * p)}}
    baseline: {layer: key}
    masks (components): {module: [float]}, ablated (components): {module: [int]}, pgd_history
    sweep (component sweep): [{module, components: [int], index: [ablation index]}]
Attention probabilities are quantised to 1/255 for the page only; the .npz keeps float32.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np

from sparse_viz.output_dir import write_output_dir
from sparse_viz.report.html import render_report, write_text_atomic

# Bytes of quantised attention patterns the page may carry (beyond that: the .npz has them).
PATTERN_BUDGET = 12_000_000
MAX_REPORT_SEQUENCES = 4
MAX_PATTERN_PNGS = 6


def _encode(pattern: np.ndarray) -> dict[str, Any]:
    """(N, H, T, T) probabilities -> {shape, data: base64 uint8}."""
    q = np.clip(np.rint(np.nan_to_num(pattern) * 255.0), 0, 255).astype(np.uint8)
    return {"shape": list(q.shape), "data": base64.b64encode(q.tobytes()).decode("ascii")}


def _round(values: np.ndarray, digits: int = 6) -> list:
    return [[None if not np.isfinite(v) else float(np.round(v, digits)) for v in row] for row in values]


class _PatternStore:
    """Patterns to embed, keyed by content identity, within PATTERN_BUDGET bytes."""

    def __init__(self, budget: int = PATTERN_BUDGET):
        self.budget, self.used, self.items = budget, 0, {}

    def add(self, key: str, pattern: np.ndarray) -> bool:
        pattern = pattern[:MAX_REPORT_SEQUENCES]
        if key in self.items:
            return True
        if self.used + pattern.size > self.budget:
            return False
        self.items[key] = _encode(pattern)
        self.used += pattern.size
        return True


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


# What every column of the ablation CSVs means (written into metadata.json's "definitions").
METRIC_DEFINITIONS = {
    "kl_divergence": "KL(baseline || ablated) = sum_v p (log p - log q), p and q the next-token distributions "
                     "without and with the ablation, averaged over ALL positions of ALL sequences",
    "kl_max_position": "the largest per-position KL(baseline || ablated)",
    "frac_top1_changed": "share of positions whose argmax next token differs after the ablation",
    "delta_logprob_top1": "mean change of the ablated model's logit of the baseline's top-1 token "
                          "(ablated - baseline), over all positions",
    "reconstruction_kl": "components only: KL(original || all components kept), how far the decomposition "
                         "itself already is from the model",
    "component_norm": "component sweep only: the norm of the component's rank-1 weight",
}


def _write_metadata(out: Path, analysis: str, result, notes: list[str], metadata: dict[str, Any] | None) -> None:
    """metadata.json: what ran (`metadata`, from the caller: model, prompt, arguments, timings)
    and how to read the results (the metric definitions and the report's notes).

    Args:
        out: the staging output folder.
        analysis: "heads", "components" or "component_sweep".
        result: the study's result (its tokens are recorded).
        notes: the report's notes (definitions specific to this run).
        metadata: the caller's keys; they come first, the definitions last.
    """
    import json

    document = {
        "analysis": analysis, **(metadata or {}),
        "tokens": [list(t) for t in result.tokens],
        "definitions": {**METRIC_DEFINITIONS, "notes": notes},
    }
    write_text_atomic(out / "metadata.json", json.dumps(document, ensure_ascii=False, indent=1, default=str))


def _write_report(out: Path, payload: dict[str, Any]) -> None:
    import json

    write_text_atomic(out / "report_data.json", json.dumps(payload, ensure_ascii=False, allow_nan=False))
    render_report("ablation.html.j2", out / "report.html", title=payload["title"], data=payload)


def render_ablation_report(run_dir: str | os.PathLike) -> Path:
    """Re-render `run_dir/report.html` from its `report_data.json` (no torch, no model).

    Raises:
        UserInputError: no readable report_data.json in `run_dir`.
    """
    import json

    from sparse_viz.errors import UserInputError

    path = Path(run_dir) / "report_data.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read {str(path)!r}: {type(error).__name__}") from error
    return render_report("ablation.html.j2", Path(run_dir) / "report.html", title=payload["title"], data=payload)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg).
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _token_ticks(ax, tokens: list[str], T: int, most: int = 32) -> None:
    """Token text on both axes of a (T, T) pattern (queries down, keys across); with more than
    `most` tokens only every n-th is labelled, so labels stay readable."""
    every = max(1, -(-T // most))
    positions = list(range(0, T, every))
    labels = [(tokens[t] if t < len(tokens) else "").replace("\n", "\u21b5").replace(" ", "\u00b7")[:10] for t in positions]
    ax.set_xticks(positions, labels, rotation=90, fontsize=6)
    ax.set_yticks(positions, labels, fontsize=6)


def patterns_figure(baseline: np.ndarray, ablated: np.ndarray, tokens: list[str], title: str):
    """Baseline (top row) vs ablated (bottom row) attention of every head of one layer, with the
    tokens on the axes of the first column and the last row, and a colour scale.

    Args:
        baseline, ablated: (H, T, T) for ONE sequence.
        tokens: the sequence's token strings (labels).
        title: the figure title.

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    H, T, _ = baseline.shape
    fig, axes = plt.subplots(2, H, figsize=(2.2 * H + 2.2, 5.6), squeeze=False, layout="constrained")
    for h in range(H):
        for row, (pattern, label) in enumerate(((baseline, "baseline"), (ablated, "ablated"))):
            ax = axes[row, h]
            image = ax.imshow(pattern[h], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            _token_ticks(ax, tokens, T)
            if h > 0:
                ax.set_yticklabels([])
            if row == 0:
                ax.set_xticklabels([])
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"{label}: query", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.suptitle(title + " (columns: key token)", fontsize=10)
    return fig


def head_heatmap_figure(table, n_layers: int, n_heads: int):
    """Layer x head heatmaps of KL and of the share of changed top-1 predictions (single heads)."""
    plt = _pyplot()
    singles = table[table["kind"] == "head"]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * n_heads * 2, 1.5 + 0.25 * n_layers), squeeze=False)
    for ax, column, label in zip(axes[0], ("kl_divergence", "frac_top1_changed"), ("KL(baseline || ablated)", "share of top-1 changed")):
        grid = np.full((n_layers, n_heads), np.nan)
        for _, row in singles.iterrows():
            grid[int(row["layer"]), int(row["head"])] = row[column]
        image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xlabel("head"), ax.set_ylabel("layer"), ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _save_fig(fig, path: Path) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]


# --------------------------------------------------------------------------------------------
# Head ablation.
# --------------------------------------------------------------------------------------------


def _ablation_entries(result, extra) -> tuple[list[dict[str, Any]], _PatternStore, dict[str, str], int]:
    """Report entries of a sweep-shaped result (heads, or a component sweep).

    Args:
        result: has table, ablations (with .name), kl_per_position (A, N, T), predictions,
            baseline_patterns {layer: (N, H, T, T)} and ablated_patterns [{layer: ...}].
        extra: i -> entry fields of ablation i beyond the shared ones.
    Returns:
        (entries, pattern store, baseline {layer: key}, count of entries without patterns).
    """
    store = _PatternStore()
    baseline = {}
    # Embed baseline layers that some ablation's patterns refer to first, then others if room.
    needed = sorted({L for pats in result.ablated_patterns for L in pats})
    for L in needed + [L for L in sorted(result.baseline_patterns) if L not in needed]:
        if store.add(f"b{L}", result.baseline_patterns[L]):
            baseline[str(L)] = f"b{L}"
    entries = []
    for i, ablation in enumerate(result.ablations):
        row = result.table.iloc[i]
        entries.append({
            "name": ablation.name, **extra(i),
            "kl_divergence": float(row["kl_divergence"]), "frac_top1_changed": float(row["frac_top1_changed"]),
            "delta_logprob_top1": float(row["delta_logprob_top1"]),
            "kl_per_position": _round(result.kl_per_position[i][:MAX_REPORT_SEQUENCES]),
            "predictions": [p for p in result.predictions[i] if p["seq"] < MAX_REPORT_SEQUENCES],
            "pattern_layers": sorted(result.ablated_patterns[i]) if result.ablated_patterns else [],
            "patterns": None,
        })
    order = np.argsort(-result.table["kl_divergence"].to_numpy(), kind="stable")
    for i in order:  # the largest effects get their patterns embedded first
        if not result.ablated_patterns:
            break
        keys = {}
        for L, pattern in result.ablated_patterns[i].items():
            if str(L) in baseline and store.add(f"a{i}_{L}", pattern):
                keys[str(L)] = f"a{i}_{L}"
        entries[i]["patterns"] = keys or None
    missing = sum(e["patterns"] is None for e in entries) if result.ablated_patterns else 0
    return entries, store, baseline, missing


def head_ablation_payload(result, title: str = "Head ablation") -> dict[str, Any]:
    """The JSON payload of the head-ablation report (see the module docstring)."""
    layout = result.layout

    def extra(i):
        ablation, row = result.ablations[i], result.table.iloc[i]
        return {"kind": ablation.kind, "layer": int(row["layer"]), "head": int(row["head"]),
                "heads": [list(p) for p in ablation.heads], "kv_heads": [list(p) for p in ablation.kv_heads],
                "positions": row["positions"]}

    ablations, store, baseline, missing = _ablation_entries(result, extra)
    notes = [
        "Ablating head h of layer L zeroes its output z (the o_proj input slice [h*hd, (h+1)*hd)); the head's "
        "own attention is unchanged, so ablated patterns are shown at later layers.",
        "KL(baseline || ablated) = mean over ALL positions of ALL sequences of sum_v p (log p - log q).",
    ]
    if any(a.kv_heads for a in result.ablations):
        notes.append("KV-head ablation zeroes that KV head's values at every position; with GQA this equals "
                     f"ablating its {layout.group_size} query heads.")
    if missing:
        notes.append(f"{missing} ablation(s) have no patterns in this page (size budget); "
                     "head_ablation_patterns.npz has them all.")
    return {
        "kind": "heads", "title": title, "n_layers": layout.n_layers, "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads, "notes": notes,
        "tokens": result.tokens[:MAX_REPORT_SEQUENCES], "n_sequences": len(result.tokens),
        "ablations": ablations, "patterns": store.items, "baseline": baseline,
    }


def _write_sweep_files(out: Path, result, stem: str, plots: bool) -> None:
    """`{stem}.csv`, `{stem}_patterns.npz`, predictions.json and the largest effects' pattern PNGs."""
    import json

    result.table.to_csv(out / f"{stem}.csv", index=False)
    arrays = {"kl_per_position": result.kl_per_position, "input_ids": result.input_ids, "valid": result.valid,
              "ablation_names": np.array([a.name for a in result.ablations])}
    for L, pattern in result.baseline_patterns.items():
        arrays[f"baseline_layer{L}"] = pattern
    for i, pats in enumerate(result.ablated_patterns):
        for L, pattern in pats.items():
            arrays[f"ablation{i}_layer{L}"] = pattern
    _save_npz(out / f"{stem}_patterns.npz", arrays)
    write_text_atomic(out / "predictions.json", json.dumps(
        {a.name: p for a, p in zip(result.ablations, result.predictions)}, ensure_ascii=False, indent=1))
    if plots and result.ablated_patterns:
        order = np.argsort(-result.table["kl_divergence"].to_numpy(), kind="stable")[:MAX_PATTERN_PNGS]
        for i in order:
            for L, pattern in result.ablated_patterns[i].items():
                for n in range(min(len(pattern), 2)):
                    name = result.ablations[i].name
                    fig = patterns_figure(result.baseline_patterns[L][n], pattern[n], result.tokens[n],
                                          f"ablation {name}: layer {L} attention, sequence {n}")
                    _save_fig(fig, out / "plots" / f"patterns_{_slug(name)}_layer{L}_seq{n}.png")


def write_head_ablation_outputs(result, output_dir, *, title: str = "Head ablation", plots: bool = True,
                                metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write head_ablation.csv, head_ablation_patterns.npz, predictions.json, metadata.json,
    plots/*.png, report.html.

    Args:
        result: a `HeadAblationResult`.
        output_dir: the folder, written whole (`sparse_viz.output_dir`): a new or empty folder,
            or an earlier result of this project with `overwrite`.
        title: the report's title.
        plots: write the PNGs.
        metadata: what ran (model, prompt, arguments, timings), written into metadata.json.
        overwrite: replace an earlier result of this project in `output_dir`.

    Returns:
        The output folder.
    """
    with write_output_dir(output_dir, written_by="write_head_ablation_outputs", overwrite=overwrite) as out:
        _write_sweep_files(out, result, "head_ablation", plots)
        if plots and (result.table["kind"] == "head").sum() > 1:
            _save_fig(head_heatmap_figure(result.table, result.layout.n_layers, result.layout.n_heads),
                      out / "plots" / "head_ablation_heatmap.png")
        payload = head_ablation_payload(result, title)
        _write_metadata(out, "heads", result, payload["notes"], metadata)
        _write_report(out, payload)
    return Path(output_dir)


# --------------------------------------------------------------------------------------------
# Component ablation.
# --------------------------------------------------------------------------------------------


def component_ablation_payload(result, title: str = "Component ablation") -> dict[str, Any]:
    """The JSON payload of the component-ablation report (see the module docstring)."""
    store = _PatternStore()
    baseline, ablated_keys = {}, {}
    for L in sorted(result.baseline_patterns):
        if store.add(f"b{L}", result.baseline_patterns[L]) and store.add(f"a{L}", result.ablated_patterns[L]):
            baseline[str(L)], ablated_keys[str(L)] = f"b{L}", f"a{L}"
    row = result.table.iloc[0]
    n_heads = next(iter(result.baseline_patterns.values())).shape[1] if result.baseline_patterns else 0
    notes = list(result.notes)
    if len(baseline) < len(result.baseline_patterns):
        notes.append("Some layers' patterns are not in this page (size budget); component_ablation_patterns.npz has them.")
    return {
        "kind": "components", "title": title, "n_layers": len(result.baseline_patterns), "n_heads": n_heads,
        "notes": notes, "tokens": [t for t in result.tokens[:MAX_REPORT_SEQUENCES]], "n_sequences": len(result.tokens),
        "mode": result.mode, "decomposition": result.decomposition_label,
        "relative_error": result.relative_error,
        "ablations": [{
            "name": row["ablation"], "kind": "components", "layer": -1, "head": -1,
            "kl_divergence": float(row["kl_divergence"]), "frac_top1_changed": float(row["frac_top1_changed"]),
            "delta_logprob_top1": float(row["delta_logprob_top1"]), "reconstruction_kl": float(row["reconstruction_kl"]),
            "kl_per_position": _round(result.kl_per_position[:MAX_REPORT_SEQUENCES]),
            "predictions": [p for p in result.predictions if p["seq"] < MAX_REPORT_SEQUENCES],
            "pattern_layers": _changed_first(result, [int(L) for L in ablated_keys]), "patterns": ablated_keys or None,
        }],
        "patterns": store.items, "baseline": baseline,
        "masks": {p: [float(v) for v in np.asarray(m).reshape(-1)] for p, m in result.masks.items()},
        "ablated": result.ablated, "pgd_history": result.pgd_history,
    }


def _changed_first(result, layers: list[int]) -> list[int]:
    """Layers ordered so that the first one is the first whose attention the ablation changed."""
    changed = [L for L in layers if np.abs(result.ablated_patterns[L] - result.baseline_patterns[L]).max() > 1e-7]
    if not changed:
        return layers
    return [L for L in layers if L >= changed[0]] + [L for L in layers if L < changed[0]]


def masks_figure(masks: dict[str, np.ndarray], ablated: dict[str, list[int]], title: str):
    """One bar chart per module: the mask value of every component (ablated ones in red)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(masks), 1, figsize=(8, 1.8 * len(masks) + 0.6), squeeze=False)
    for ax, (path, mask) in zip(axes[:, 0], masks.items()):
        mask = np.asarray(mask).reshape(-1)
        colors = ["#d62728" if c in set(ablated.get(path, [])) else "#3b6fd8" for c in range(len(mask))]
        ax.bar(np.arange(len(mask)), mask, color=colors, width=1.0)
        ax.set_ylim(0, 1.05), ax.set_ylabel("mask"), ax.set_title(path, fontsize=9)
    axes[-1, 0].set_xlabel("component")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_component_ablation_outputs(result, output_dir, *, title: str = "Component ablation", plots: bool = True,
                                     metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write component_ablation.csv, component_ablation_patterns.npz, predictions.json,
    metadata.json, plots, report.html.

    Args:
        result: a `ComponentAblationResult`.
        output_dir: the folder, written whole (`sparse_viz.output_dir`): a new or empty folder,
            or an earlier result of this project with `overwrite`.
        title: the report's title.
        plots: write the PNGs.
        metadata: what ran (model, prompt, arguments, timings), written into metadata.json.
        overwrite: replace an earlier result of this project in `output_dir`.

    Returns:
        The output folder.
    """
    import json

    with write_output_dir(output_dir, written_by="write_component_ablation_outputs", overwrite=overwrite) as out:
        result.table.to_csv(out / "component_ablation.csv", index=False)
        arrays = {"kl_per_position": result.kl_per_position, "input_ids": result.input_ids}
        for L, pattern in result.baseline_patterns.items():
            arrays[f"baseline_layer{L}"] = pattern
            arrays[f"ablated_layer{L}"] = result.ablated_patterns[L]
        for path, mask in result.masks.items():
            arrays[f"mask:{path}"] = np.asarray(mask)
        _save_npz(out / "component_ablation_patterns.npz", arrays)
        write_text_atomic(out / "predictions.json", json.dumps(result.predictions, ensure_ascii=False, indent=1))
        if plots:
            _save_fig(masks_figure(result.masks, result.ablated, f"{result.mode} masks used for the ablated run"),
                      out / "plots" / "component_masks.png")
            if result.baseline_patterns:
                import re

                found = [int(m.group(1)) for p in result.ablated if (m := re.search(r"layers\.(\d+)\.", p))]
                first = min(found) if found else 0
                for L in sorted(result.baseline_patterns)[first:first + 2]:
                    fig = patterns_figure(result.baseline_patterns[L][0], result.ablated_patterns[L][0], result.tokens[0],
                                          f"{result.mode} component ablation: layer {L} attention, sequence 0")
                    _save_fig(fig, out / "plots" / f"patterns_layer{L}_seq0.png")
        payload = component_ablation_payload(result, title)
        _write_metadata(out, "components", result, payload["notes"], metadata)
        _write_report(out, payload)
    return Path(output_dir)


# --------------------------------------------------------------------------------------------
# Component sweep.
# --------------------------------------------------------------------------------------------


def _sweep_modules(result) -> list[dict[str, Any]]:
    """Per swept module: its component indices and where each one's row is."""
    modules: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(result.ablations):
        entry = modules.setdefault(a.path, {"module": a.path, "components": [], "index": []})
        entry["components"].append(a.component)
        entry["index"].append(i)
    return list(modules.values())


def component_sweep_payload(result, title: str = "Component sweep") -> dict[str, Any]:
    """The JSON payload of a component sweep's report (the head report's shape, plus `sweep`)."""

    def extra(i):
        a = result.ablations[i]
        return {"kind": "component", "layer": a.layer, "head": -1, "module": a.path, "component": a.component,
                "component_norm": float(result.table.iloc[i]["component_norm"]),
                "reconstruction_kl": float(result.table.iloc[i]["reconstruction_kl"])}

    ablations, store, baseline, missing = _ablation_entries(result, extra)
    notes = list(result.notes)
    if missing:
        notes.append(f"{missing} ablation(s) have no patterns in this page (size budget); "
                     "component_sweep_patterns.npz has them all.")
    n_heads = next(iter(result.baseline_patterns.values())).shape[1] if result.baseline_patterns else 0
    return {
        "kind": "components", "title": title, "mode": "deterministic sweep", "decomposition": result.decomposition_label,
        "relative_error": result.relative_error, "n_layers": len(result.baseline_patterns), "n_heads": n_heads,
        "notes": notes, "tokens": result.tokens[:MAX_REPORT_SEQUENCES], "n_sequences": len(result.tokens),
        "ablations": ablations, "patterns": store.items, "baseline": baseline,
        "sweep": _sweep_modules(result), "masks": {}, "ablated": {}, "pgd_history": [],
    }


def component_sweep_figure(result):
    """One bar chart per module: KL(baseline || ablated) of each component ablated alone."""
    plt = _pyplot()
    modules = _sweep_modules(result)
    kl = result.table["kl_divergence"].to_numpy()
    fig, axes = plt.subplots(len(modules), 1, figsize=(8, 1.9 * len(modules) + 0.6), squeeze=False)
    for ax, entry in zip(axes[:, 0], modules):
        ax.bar(entry["components"], kl[entry["index"]], color="#3b6fd8", width=1.0)
        ax.set_ylabel("KL"), ax.set_title(entry["module"], fontsize=9)
    axes[-1, 0].set_xlabel("component (ablated alone)")
    fig.suptitle("component sweep: KL(original || one component removed)", fontsize=10)
    fig.tight_layout()
    return fig


def write_component_sweep_outputs(result, output_dir, *, title: str = "Component sweep", plots: bool = True,
                                  metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write component_sweep.csv, component_sweep_patterns.npz, predictions.json, metadata.json,
    plots, report.html.

    Args:
        result: a `ComponentSweepResult`.
        output_dir: the folder, written whole (`sparse_viz.output_dir`): a new or empty folder,
            or an earlier result of this project with `overwrite`.
        title: the report's title.
        plots: write the PNGs.
        metadata: what ran (model, prompt, arguments, timings), written into metadata.json.
        overwrite: replace an earlier result of this project in `output_dir`.

    Returns:
        The output folder.
    """
    with write_output_dir(output_dir, written_by="write_component_sweep_outputs", overwrite=overwrite) as out:
        _write_sweep_files(out, result, "component_sweep", plots)
        if plots:
            _save_fig(component_sweep_figure(result), out / "plots" / "component_sweep.png")
        payload = component_sweep_payload(result, title)
        _write_metadata(out, "component_sweep", result, payload["notes"], metadata)
        _write_report(out, payload)
    return Path(output_dir)
