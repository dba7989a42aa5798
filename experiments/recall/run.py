"""Associative recall: does the Lightning Indexer find the keys a query needs, when a local window cannot?

Trains the same model on multi-query associative recall (`configs/train/recall.yaml`: pairs at the
start, filler, queries at the end) with dense attention, DSA (dense -> indexer warm-up -> sparse
top-k), DSA from scratch, and the local / sink_local / random / oracle selectors, at each k, with
the same steps and learning-rate curve. Writes under `results/recall/`:

    table.md          final answer accuracy (all answers, and the answers whose pair lies outside
                      the local and sink windows), ground-truth hit@k in the recall layer, final
                      validation loss (answer positions only)
    accuracy.png      validation answer accuracy vs step, one line per selector, one panel per k
    <run>/            each run's directory (metrics.csv, analysis/, plots/, report.html)

    python experiments/recall/run.py                       # everything (dense + 6 selectors x 2 k)
    python experiments/recall/run.py --k 8 --only dense dsa local
    python experiments/recall/run.py --table-only          # re-read finished runs
    python experiments/recall/run.py --steps 200 60 200    # shorter recipe (dense, warmup, sparse)
    python experiments/recall/run.py --train-args "--data.seq_len=128 --model.max_seq_len=128"

Runs go `--jobs` at a time, each on one intra-op thread (2 CPU cores: two runs side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "train"
OUT = Path(os.environ.get("SPARSE_VIZ_RECALL_OUT", REPO / "results" / "recall"))
LR = 1e-3  # main-model peak learning rate of --steps recipes (3e-3 did not leave the plateau)
SELECTORS = ["dsa", "dsa_scratch", "local", "sink_local", "random", "oracle"]
COLOURS = {"dense": "#101828", "dsa": "#3b6fd8", "dsa_scratch": "#7fa7f0", "oracle": "#2e7d32",
           "sink_local": "#8e44ad", "local": "#e67e22", "random": "#7f8c8d"}


def run_name(selector: str, k: int | None) -> str:
    return "dense" if selector == "dense" else f"{selector}_k{k}"


def stage_args(selector: str, steps: tuple[int, int, int] | None, lr: float = 1e-3) -> list[str]:
    """The recipe's step counts on the command line (None: those of the config files)."""
    if steps is None:
        return []
    dense, warmup, sparse = steps
    if selector == "dsa":
        stages = (f"[{{name: dense, steps: {dense}, lr: {lr}, indexer_lr: 3.0e-3, warmup_steps: {min(30, dense)}, min_lr_ratio: 1.0}},"
                  f" {{name: warmup, steps: {warmup}, indexer_lr: 3.0e-3, min_lr_ratio: 1.0}},"
                  f" {{name: sparse, steps: {sparse}, lr: {lr}, indexer_lr: 1.0e-3, min_lr_ratio: 0.1}}]")
    elif selector == "dsa_scratch":
        stages = f"[{{name: sparse, steps: {dense + warmup + sparse}, lr: {lr}, indexer_lr: 3.0e-3, warmup_steps: {min(30, dense)}}}]"
    else:
        second = "dense" if selector == "dense" else "sparse"
        stages = (f"[{{name: dense, steps: {dense + warmup}, lr: {lr}, warmup_steps: {min(30, dense)}, min_lr_ratio: 1.0}},"
                  f" {{name: {second}, steps: {sparse}, lr: {lr}, min_lr_ratio: 0.1}}]")
    return [f"--model.stages={stages}"]


def command(selector: str, k: int | None, steps, extra: list[str] = ()) -> list[str]:
    args = [sys.executable, "-m", "sparse_viz.train", "--config", str(CONFIGS / "recall.yaml")]
    overlay = {"dense": "recall_dense", "dsa_scratch": "recall_from_scratch"}.get(selector)
    if selector in ("local", "sink_local", "random", "oracle"):
        overlay = "recall_baseline"
        args.append(f"--model.selector={selector}")
    if overlay:
        args[5:5] = ["--config", str(CONFIGS / f"{overlay}.yaml")]
    if k is not None:
        args.append(f"--model.top_k={k}")
    return args + stage_args(selector, steps, LR) + list(extra) + ["--run_root", str(OUT), "--run_name", run_name(selector, k),
                                                 "--trainer.enable_progress_bar=false"]


def train(selector: str, k: int | None, steps, extra: list[str] = ()) -> tuple[str, float]:
    name = run_name(selector, k)
    args = command(selector, k, steps, extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.time()
    log = OUT / f"{name}.log"
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        result = subprocess.run(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {result.returncode}); see {log}")
    return name, time.time() - started


# ------------------------------------------------------------------------------- reading runs
def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/accuracy")]


def last_snapshot(run_dir: Path) -> dict:
    lines = (run_dir / "analysis" / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def recall_layer(dense_dir: Path) -> int:
    """The layer whose dense attention puts the most mass on the ground-truth value at the end of
    the dense run: where the model looks the answer up."""
    snap = last_snapshot(dense_dir)
    layers = sorted({int(name[1:].split("/")[0]) for name in snap if name.endswith("/gt_mass")})
    return max(layers, key=lambda layer: snap[f"L{layer}/gt_mass"])


def split_accuracy(run_dir: Path, k: int, sink_tokens: int, batches: int = 4) -> tuple[float, float, int]:
    """Validation answer accuracy of the final checkpoint, over the answers whose value lies
    outside both the local window (t - s >= k) and the sink tokens (s >= sink_tokens), and over the
    others: (far accuracy, near accuracy, far answers counted); NaN where there are none."""
    import torch
    import yaml

    from sparse_viz.data import RecallDataModule
    from sparse_viz.training import DSALightningModule
    from sparse_viz.training.batches import split_batch

    module = DSALightningModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = RecallDataModule(**config["data"]["init_args"])
    attention = module.schedule.stages[-1].attention
    far = [0, 0]
    near = [0, 0]
    loader = iter(data.val_dataloader())
    with torch.no_grad():
        for _ in range(batches):
            batch = next(loader, None)
            if batch is None:
                break
            inputs, targets, mask = split_batch(batch)
            correct = module.model(inputs, attention=attention).logits.argmax(-1) == targets  # (B, T)
            value = batch["ground_truth"][..., 1]  # (B, T)
            t = torch.arange(inputs.shape[1])[None, :]
            outside = (t - value >= k) & (value >= sink_tokens)
            for bucket, where in ((far, mask & outside), (near, mask & ~outside)):
                bucket[0] += int((correct & where).sum())
                bucket[1] += int(where.sum())
    rate = lambda bucket: bucket[0] / bucket[1] if bucket[1] else float("nan")  # noqa: E731
    return rate(far), rate(near), far[1]


def fmt(value, digits=3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def write_table(ks: list[int], selectors: list[str]) -> Path:
    dense_dir = OUT / "dense"
    layer = recall_layer(dense_dir) if (dense_dir / "analysis" / "history.jsonl").is_file() else 1
    lines = [
        f"Recall layer (most dense attention on the ground-truth value in the dense run): layer {layer}.",
        "",
        "| run | selector | k | step | accuracy | accuracy, pair outside window | hit@k (recall layer) | "
        "oracle hit@k | dense mass on value | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("dense", None)] + [(s, k) for k in ks for s in selectors]
    for selector, k in rows:
        run_dir = OUT / run_name(selector, k)
        if not (run_dir / "metrics.csv").is_file():
            continue
        metrics = metric_rows(run_dir)
        if not metrics:
            continue
        final = metrics[-1]
        snap = last_snapshot(run_dir)
        config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
        top_k = k if k is not None else int(config["model"]["top_k"])
        far, _, _ = split_accuracy(run_dir, top_k, int(config["model"]["sink_tokens"]))
        hit = snap.get(f"L{layer}/gt_hit_at_k") if selector != "dense" else None
        lines.append(
            f"| {run_name(selector, k)} | {selector} | {k if k is not None else 'all'} | {int(final['step']) + 1} "
            f"| {fmt(float(final['val/accuracy']))} | {fmt(far)} | {fmt(hit)} "
            f"| {fmt(snap.get(f'L{layer}/gt_hit_at_k_oracle'))} | {fmt(snap.get(f'L{layer}/gt_mass'))} "
            f"| {float(final['val/loss']):.4f} |")
    table = OUT / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def plot_accuracy(ks: list[int], selectors: list[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(ks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks):
        for selector in ["dense", *selectors]:
            run_dir = OUT / run_name(selector, k)
            if not (run_dir / "metrics.csv").is_file():
                continue
            rows = metric_rows(run_dir)
            ax.plot([int(r["step"]) + 1 for r in rows], [float(r["val/accuracy"]) for r in rows], "o-", ms=3,
                    color=COLOURS[selector], label=selector.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"associative recall, k = {k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation answer accuracy")
        ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    path = OUT / "accuracy.png"
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--only", nargs="+", choices=["dense", *SELECTORS], default=["dense", *SELECTORS])
    parser.add_argument("--steps", type=int, nargs=3, default=None, metavar=("DENSE", "WARMUP", "SPARSE"),
                        help="recipe step counts (default: those of configs/train/recall*.yaml)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--train-args", default="", help="more options for every run, e.g. '--data.seq_len=128'")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    selectors = [s for s in SELECTORS if s in args.only]
    if not args.table_only:
        jobs = ([("dense", None)] if "dense" in args.only else []) + [(s, k) for k in args.k for s in selectors]
        started = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            extra = shlex.split(args.train_args)
            for name, seconds in pool.map(lambda job: train(job[0], job[1], args.steps, extra), jobs):
                print(f"{name}: {seconds:.0f} s", flush=True)
        print(f"all runs: {time.time() - started:.0f} s", flush=True)
    print(write_table(args.k, selectors).read_text())
    print(plot_accuracy(args.k, selectors))


if __name__ == "__main__":
    main()
