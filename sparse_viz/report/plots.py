"""Matplotlib figures of a training run, made from the files in its run directory only.

    plots/attention_patterns.png   6 panels: attention patterns, selection and its baselines over training
    plots/indexer_behavior.png     4 panels
    plots/ground_truth.png         a task with ground truth (associative recall) only: per layer,
                                   ground-truth hit@k of the run's selection and the baselines,
                                   and the probe's answer accuracy
    plots/selection/step_XXXXXXX.png   one selection heatmap (query x key) per snapshot,
                                   one panel per chosen layer

Reads `analysis/history.jsonl`, `analysis/step_*.npz` and `analysis/probe.json` through
`RunStore` (numpy only): no torch, no model. Figures are built with `matplotlib.figure.Figure`
and the Agg canvas, so no pyplot state or GUI backend is involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES

DPI = 120
BASELINE_STYLES = {
    "mass_at_k": ("indexer", "#3b6fd8", "-"),
    "mass_at_k_oracle": ("oracle", "#2e7d32", "--"),
    "mass_at_k_sink_local": ("sink+local", "#8e44ad", ":"),
    "mass_at_k_local": ("local", "#e67e22", ":"),
    "mass_at_k_random": ("random", "#7f8c8d", "-."),
}
STAGE_COLOURS = {"dense": "#f2f4f7", "warmup": "#fff4e0", "sparse": "#eaf3ea"}


def _value(record: dict, name: str) -> float:
    value = record.get(name)
    return math.nan if value is None else float(value)


def _series(history: Sequence[dict], name: str) -> np.ndarray:
    return np.array([_value(r, name) for r in history], dtype=np.float64)


def _steps(history: Sequence[dict]) -> np.ndarray:
    return np.array([int(r["step"]) for r in history])


def _shade_stages(ax, history: Sequence[dict]) -> None:
    """Background bands for the training stages (dense / warmup / sparse)."""
    if not history:
        return
    steps = _steps(history)
    start = 0
    for i in range(1, len(history) + 1):
        if i == len(history) or history[i].get("stage") != history[start].get("stage"):
            end = steps[i] if i < len(history) else steps[-1]
            colour = STAGE_COLOURS.get(str(history[start].get("stage")), "#ffffff")
            ax.axvspan(steps[start], end, color=colour, zorder=0, lw=0)
            start = i


def _save(fig: Figure, path: Path) -> Path:
    """Save through a temp file + rename: a killed render never leaves a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def _empty(ax, text: str) -> None:
    """A panel with nothing to draw says why, instead of standing empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#667085", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, fontsize: int = 8, ncol: int = 1) -> None:
    """The panel's legend beside it (right of the axes), so it never covers a curve; nothing
    when the panel has no labelled artist (an empty legend box says nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _stage_legend(fig: Figure, history: Sequence[dict]) -> None:
    """One legend for the stage bands, below the panels: the stages in the order they ran."""
    from matplotlib.patches import Patch

    stages = list(dict.fromkeys(str(r.get("stage")) for r in history if r.get("stage") is not None))
    if stages:
        handles = [Patch(facecolor=STAGE_COLOURS.get(stage, "#ffffff"), edgecolor="#98a2b3", label=f"{stage} stage")
                   for stage in stages]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) + 1, fontsize=9,
                   title="panel background: the training stage at that step", title_fontsize=9)


def _colorbar_beside(fig: Figure, mappable, ax, label: str, height: float = 1.0):
    """A colour bar right beside `ax` (a gap of 2% of its width), `height` of its height from the
    bottom. It is an inset of `ax`, so it moves with its panel: constrained layout puts a
    `fig.colorbar(ax=ax)` bar past its column's shared margin, which a legend beside another
    panel of the column widens, and the bar ends up far from its own panel."""
    cax = ax.inset_axes([1.02, 0.0, 0.035, height])
    return fig.colorbar(mappable, cax=cax, label=label)


def _plain_tick_labels(fig: Figure) -> None:
    """Tick labels show the values themselves: no offset ('+5.245' above an axis of values that
    differ in the fourth decimal, with ticks reading 0.0001, 0.0002, ... meaning 5.2451, ...)."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            formatter = axis.get_major_formatter()
            if isinstance(formatter, ScalarFormatter):
                formatter.set_useOffset(False)


def _n_layers(snapshots: dict[int, dict]) -> int | None:
    """Layers in the stored arrays (None without snapshot arrays)."""
    for arrays in snapshots.values():
        if "pos_freq" in arrays:
            return int(np.asarray(arrays["pos_freq"]).shape[0])
    return None


def _layers_note(snapshots: dict[int, dict]) -> str:
    n = _n_layers(snapshots)
    return "mean over layers" if n is None else f"mean over the {n} layers"


def _layer_mean(array: np.ndarray) -> np.ndarray:
    """Mean over the leading layer axis, ignoring NaN (all-NaN -> NaN without a warning)."""
    with np.errstate(invalid="ignore"):
        count = np.sum(np.isfinite(array), axis=0)
        total = np.nansum(array, axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _pick(n: int, most: int = 6) -> list[int]:
    """Up to `most` evenly spaced indices of n items, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, most)})


def attention_patterns_figure(history: list[dict], snapshots: dict[int, dict]) -> Figure:
    """The 6 panels: position frequency, entropy, score distribution, quality/efficiency,
    head pattern clustering (PCA + KMeans), selection quality vs validation loss."""
    fig = Figure(figsize=(22, 10.5), layout="constrained")
    axes = fig.subplots(2, 3)
    steps = _steps(history)
    over = _layers_note(snapshots)
    fig.suptitle(f"Selection and attention over training: every panel shows the {over} "
                 "(report.html shows each layer)", fontsize=12)
    _stage_legend(fig, history)
    import matplotlib

    viridis = matplotlib.colormaps["viridis"]

    # 1. selection frequency by absolute key position, a few snapshots
    ax = axes[0, 0]
    chosen = [i for i in _pick(len(history)) if steps[i] in snapshots]
    for j, i in enumerate(chosen):
        freq = _layer_mean(snapshots[steps[i]]["pos_freq"])
        if np.isfinite(freq).any():  # a dense run records no selection: nothing to draw
            ax.plot(np.arange(len(freq)), freq, color=viridis(j / max(len(chosen) - 1, 1)), lw=1.2,
                    label=f"step {steps[i]}")
    if ax.get_lines():
        _legend(ax)
    else:
        _empty(ax, "no key selection recorded\n(dense attention selects every key)" if chosen else "no snapshot arrays")
    ax.set_title(f"Selection frequency by key position\n({over})")
    ax.set_xlabel("key position s")
    ax.set_ylabel("P(s selected | visible), informative rows")

    # 2. attention entropy over steps
    ax = axes[0, 1]
    _shade_stages(ax, history)
    ax.plot(steps, _series(history, "entropy_sparse"), "o-", label="attention used (sparse)", ms=3)
    ax.plot(steps, _series(history, "entropy_dense"), "s--", label="dense attention", ms=3)
    ax.set_title(f"Attention entropy over steps\n({over})")
    ax.set_xlabel("training step")
    ax.set_ylabel("entropy (nats, mean over heads and queries)")
    _legend(ax)

    # 3. indexer score distribution (first / middle / last snapshot, all layers pooled)
    ax = axes[0, 2]
    drawn = False
    for j, i in enumerate(_pick(len(history), 3)):
        arrays = snapshots.get(steps[i])
        if arrays is None or not np.isfinite(arrays["score_edges"]).any():
            continue
        edges, hist = arrays["score_edges"], arrays["score_hist"]
        centres = (edges[:, 1:] + edges[:, :-1]) / 2
        ok = np.isfinite(centres)
        common = np.linspace(np.nanmin(edges), np.nanmax(edges), 41)
        counts, _ = np.histogram(centres[ok], bins=common, weights=hist[ok])
        ax.stairs(counts / max(counts.sum(), 1), common, label=f"step {steps[i]}",
                  color=viridis(j / 2), lw=1.5)
        drawn = True
    if drawn:
        _legend(ax)
    else:
        _empty(ax, "no indexer scores in this run\n(no Lightning Indexer, or no snapshot arrays)")
    ax.set_title("Indexer score distribution I[t, s], s <= t\n(all layers pooled)")
    ax.set_xlabel("score")
    ax.set_ylabel("share of (t, s) pairs")

    # 4. selection quality and efficiency over steps
    ax = axes[1, 0]
    _shade_stages(ax, history)
    for name, (label, colour, style) in BASELINE_STYLES.items():
        values = _series(history, name)
        if np.isfinite(values).any():
            ax.plot(steps, values, style, color=colour, label=f"mass@k {label}", lw=1.5)
    recall = _series(history, "recall_at_k")
    if np.isfinite(recall).any():
        ax.plot(steps, recall, "-", color="#c0392b", lw=1, alpha=0.8, label="recall@k indexer")
    ax.plot(steps, _series(history, "keys_share"), ":", color="#101828", lw=1, label="keys attended / visible")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Selection quality and efficiency\n({over})")
    ax.set_xlabel("training step")
    ax.set_ylabel("share")
    _legend(ax, fontsize=7)

    # 5. attention pattern clustering: PCA + KMeans over per-head distance profiles
    ax = axes[1, 1]
    points, point_steps = [], []
    for step in steps:
        arrays = snapshots.get(step)
        if arrays is None:
            continue
        features = arrays["head_features"]  # (L, H, F)
        points.append(features.reshape(-1, features.shape[-1]))
        point_steps.append(np.full(points[-1].shape[0], step))
    if points and sum(len(p) for p in points) >= 3:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        X = np.nan_to_num(np.concatenate(points))
        colour_steps = np.concatenate(point_steps)
        xy = PCA(n_components=2, random_state=0).fit_transform(X) if X.shape[1] >= 2 else np.c_[X, X]
        n_clusters = min(4, len(np.unique(X, axis=0)))
        labels = KMeans(n_clusters=max(n_clusters, 1), n_init=10, random_state=0).fit_predict(X)
        markers = "osD^"
        for c in range(max(n_clusters, 1)):
            sel = labels == c
            scatter = ax.scatter(xy[sel, 0], xy[sel, 1], c=colour_steps[sel], cmap="viridis",
                                 vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1),
                                 marker=markers[c % 4], s=22, label=f"cluster {c}", alpha=0.85)
        _legend(ax, fontsize=7)  # beside the panel's top, above the colour bar
        _colorbar_beside(fig, scatter, ax, "training step", height=0.6)
    else:
        _empty(ax, "too few heads to cluster")
    ax.set_title("Head attention patterns (PCA of distance profiles, KMeans)\n(every head of every layer)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")

    # 6. selection quality vs validation loss
    ax = axes[1, 2]
    loss, mass = _series(history, "val_loss"), _series(history, "mass_at_k")
    ok = np.isfinite(loss) & np.isfinite(mass)
    if ok.any():
        scatter = ax.scatter(mass[ok], loss[ok], c=steps[ok], cmap="viridis", s=28)
        _colorbar_beside(fig, scatter, ax, "training step")
    else:
        _empty(ax, "no validation loss recorded yet")
    ax.set_title(f"Selection quality vs validation loss\n(mass@k: {over})")
    ax.set_xlabel("mass@k of the indexer's selection")
    ax.set_ylabel("validation loss (latest at the snapshot)")
    _plain_tick_labels(fig)
    return fig


def indexer_behavior_figure(history: list[dict], snapshots: dict[int, dict]) -> Figure:
    """The 4 panels: head specialisation, score mean ± std, selection biases, token types."""
    fig = Figure(figsize=(17, 9.5), layout="constrained")
    axes = fig.subplots(2, 2)
    steps = _steps(history)
    have = [s for s in steps if s in snapshots]
    over = _layers_note(snapshots)
    fig.suptitle(f"Indexer behaviour over training: every panel shows the {over} (report.html shows each layer)",
                 fontsize=12)
    _stage_legend(fig, history)

    # 1. indexer head specialisation (mean over layers, one line per head)
    ax = axes[0, 0]
    _shade_stages(ax, history)
    if have:
        spec = np.stack([_layer_mean(snapshots[s]["head_spec"]) for s in have])  # (S, H_I)
        for head in range(spec.shape[1]):
            if np.isfinite(spec[:, head]).any():
                ax.plot(have, spec[:, head], "o-", ms=3, label=f"head {head}")
    if ax.get_lines():
        _legend(ax)
    else:
        _empty(ax, "no indexer heads in this run\n(no Lightning Indexer, or no snapshot arrays)")
    ax.set_title(f"Indexer head specialisation (1 - normalised entropy)\n({over})")
    ax.set_xlabel("training step")
    ax.set_ylabel("specialisation (0 spread, 1 one key)")

    # 2. score mean ± std, min/max
    ax = axes[0, 1]
    _shade_stages(ax, history)
    mean, std = _series(history, "score_mean"), _series(history, "score_std")
    if np.isfinite(mean).any():
        ax.plot(steps, mean, "o-", ms=3, color="#3b6fd8", label="mean")
        ax.fill_between(steps, mean - std, mean + std, color="#3b6fd8", alpha=0.25, label="± std")
        ax.plot(steps, _series(history, "score_min"), ":", color="#667085", label="min / max")
        ax.plot(steps, _series(history, "score_max"), ":", color="#667085")
        _legend(ax)
    else:
        _empty(ax, "no indexer scores in this run\n(no Lightning Indexer)")
    ax.set_title(f"Indexer score evolution\n({over})")
    ax.set_xlabel("training step")
    ax.set_ylabel("I[t, s]")

    # 3. selection biases over steps
    ax = axes[1, 0]
    _shade_stages(ax, history)
    for name, label in (("sink_share", "sink share (key 0)"), ("local_share", "local-window share (t - s < k)"),
                        ("jaccard_prev", "Jaccard with previous snapshot")):
        values = _series(history, name)
        if np.isfinite(values).any():
            ax.plot(steps, values, "o-", ms=3, label=label)
    if ax.get_lines():
        ax.set_ylim(0, 1.02)
        _legend(ax)
    else:
        _empty(ax, "no key selection recorded\n(dense attention selects every key)")
    ax.set_title(f"Selection bias and stability\n({over})")
    ax.set_xlabel("training step")
    ax.set_ylabel("share")

    # 4. selected token types at the last snapshot vs their share of visible keys. A type the
    # probe does not contain (base rate 0: no digits in Shakespeare) has nothing to show: it is
    # left out and named under the panel instead of standing as an empty slot.
    ax = axes[1, 1]
    if have:
        last = snapshots[have[-1]]
        share, base = _layer_mean(last["type_share"]), _layer_mean(last["type_base"])
        present = [i for i in range(len(TOKEN_TYPES)) if np.isfinite(base[i]) and base[i] > 0]
        absent = [TOKEN_TYPES[i] for i in range(len(TOKEN_TYPES)) if i not in present]
        if present:
            x = np.arange(len(present))
            ax.bar(x - 0.2, share[present], width=0.4, label=f"selected keys (step {have[-1]})", color="#3b6fd8")
            ax.bar(x + 0.2, base[present], width=0.4, label="visible keys (base rate)", color="#d0d5dd")
            ax.set_xticks(x, [TOKEN_TYPES[i] for i in present], rotation=20)
            _legend(ax)
            if absent:
                ax.set_xlabel(f"not in the probe batch, so not shown: {', '.join(absent)}", color="#667085")
        else:
            _empty(ax, "no selected-key token types recorded\n(dense attention selects every key)")
    else:
        _empty(ax, "no snapshot arrays")
    ax.set_title(f"Selected token types\n({over})")
    ax.set_ylabel("share of selections / of visible keys")
    _plain_tick_labels(fig)
    return fig


GT_SERIES = [
    ("gt_hit_at_k", "selection (hit@k)", "#3b6fd8", "-"),
    ("gt_hit_at_k_oracle", "oracle", "#2e7d32", "--"),
    ("gt_hit_at_k_sink_local", "sink+local", "#8e44ad", ":"),
    ("gt_hit_at_k_local", "local", "#e67e22", ":"),
    ("gt_hit_at_k_random", "random", "#7f8c8d", "-."),
    ("gt_mass", "dense attention mass on the value", "#c0392b", "-"),
]


def ground_truth_figure(history: list[dict]) -> Figure:
    """One panel per layer: share of answer positions whose selection holds the ground-truth
    value position (the run's selection and each baseline's), and the dense attention mass on it;
    a last panel: the probe's answer accuracy."""
    n_layers = 1 + max((int(name[1:].split("/")[0]) for r in history for name in r
                        if name.startswith("L") and name.endswith("/gt_mass")), default=0)
    fig = Figure(figsize=(6.5 * (n_layers + 1), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_layers + 1))
    steps = _steps(history)
    _stage_legend(fig, history)
    for layer in range(n_layers):
        ax = axes[layer]
        _shade_stages(ax, history)
        for name, label, colour, style in GT_SERIES:
            values = _series(history, f"L{layer}/{name}")
            if np.isfinite(values).any():
                ax.plot(steps, values, style, marker="o", ms=3, color=colour, label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"layer {layer}: ground truth in the selection")
        ax.set_xlabel("training step")
        ax.set_ylabel("share of answer positions / attention mass")
        _legend(ax, fontsize=7)
    ax = axes[-1]
    _shade_stages(ax, history)
    accuracy = _series(history, "answer_accuracy")
    if np.isfinite(accuracy).any():
        ax.plot(steps, accuracy, "o-", ms=3, color="#101828")
    else:
        _empty(ax, "no answer accuracy recorded")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("answer accuracy on the probe")
    ax.set_xlabel("training step")
    _plain_tick_labels(fig)
    return fig


def selection_heatmap_figure(arrays: dict, layers: Sequence[int], step: int) -> Figure:
    """Query x key selection matrix of probe row 0 for each chosen layer.

    A selected cell's colour is the dense attention probability (mean over heads) on that key;
    visible but unselected cells are light grey; the future is white.
    """
    fig = Figure(figsize=(4.2 * len(layers) + 1.2, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    import matplotlib

    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad=(0, 0, 0, 0))
    for ax, layer in zip(axes, layers):
        selected = arrays["show_selected"][layer].astype(np.int64)  # (T, k)
        dense = arrays["show_dense"][layer]  # (T, k)
        T = selected.shape[0]
        image = np.full((T, T), np.nan)
        image[np.tril(np.ones((T, T), dtype=bool))] = -1.0
        rows, slots = np.nonzero(selected >= 0)
        image[rows, selected[rows, slots]] = np.nan_to_num(np.sqrt(np.clip(dense[rows, slots], 0, 1)))
        shown = np.ma.masked_invalid(np.where(image < 0, np.nan, image))
        ax.imshow(np.ma.masked_invalid(np.where(image == -1.0, 1.0, np.nan)), cmap=ListedColormap(["#e4e7ec"]),
                  vmin=0, vmax=1, interpolation="nearest")
        im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer}, step {step}")
        ax.set_xlabel("key s")
        ax.set_ylabel("query t")
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="sqrt(dense attention) on selected keys")
    return fig


def _check_heatmap_layers(layers: Sequence[int] | None, snapshots: dict[int, dict]) -> None:
    """Layers asked for explicitly must exist: an explicit choice that draws nothing is an error."""
    from sparse_viz.errors import UserInputError

    if layers is not None and not list(layers):
        raise UserInputError("--heatmap-layers names no layer")
    counts = {int(arrays["show_selected"].shape[0]) for arrays in snapshots.values()}
    if layers is None or not counts:
        return
    n_layers = min(counts)
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise UserInputError(f"--heatmap-layers {','.join(map(str, outside))}: the run's snapshots have "
                             f"layers 0-{n_layers - 1}")


def render_plots(run_dir: str | os.PathLike, heatmap_layers: Sequence[int] | None = None,
                 redraw_heatmaps: bool = False) -> list[Path]:
    """Write the summary PNGs and the per-snapshot selection heatmaps of a run directory.

    Args:
        run_dir: a run directory with `analysis/history.jsonl`.
        heatmap_layers: the layers shown in each heatmap, one panel each (None: all layers).
        redraw_heatmaps: redraw every snapshot's heatmap with exactly `heatmap_layers`, even
            where one exists (which then shows only those layers); a layer the run does not
            have is an error. Otherwise a heatmap is drawn only where it is missing or older
            than its snapshot, and layers the run does not have are left out.

    Returns:
        The paths written.

    Raises:
        UserInputError: `redraw_heatmaps` with no layer or with a layer the run does not have
            (raised before anything is written).
    """
    store = RunStore(run_dir)
    history = store.read_history()
    snapshots = {}
    for record in history:
        if store.snapshot_path(record["step"]).is_file():
            snapshots[int(record["step"])] = store.load_snapshot(record["step"])
    if redraw_heatmaps:
        _check_heatmap_layers(heatmap_layers, snapshots)
    plots = Path(run_dir) / "plots"
    written = [
        _save(attention_patterns_figure(history, snapshots), plots / "attention_patterns.png"),
        _save(indexer_behavior_figure(history, snapshots), plots / "indexer_behavior.png"),
    ]
    if any("gt_mass" in record for record in history):
        written.append(_save(ground_truth_figure(history), plots / "ground_truth.png"))
    for step, arrays in snapshots.items():
        n_layers = arrays["show_selected"].shape[0]
        layers = [l for l in (heatmap_layers if heatmap_layers is not None else range(n_layers)) if 0 <= l < n_layers]
        target = plots / "selection" / f"step_{step:07d}.png"
        up_to_date = target.is_file() and target.stat().st_mtime >= store.snapshot_path(step).stat().st_mtime
        if not layers or (up_to_date and not redraw_heatmaps):
            continue
        written.append(_save(selection_heatmap_figure(arrays, layers, step), target))
    return written
