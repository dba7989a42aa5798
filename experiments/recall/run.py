"""Associative recall: does the Lightning Indexer find the keys a query needs, when a local window cannot?

Trains the same model on multi-query associative recall (`configs/train/recall.yaml`: pairs at the
start, filler, queries at the end) with dense attention, DSA (dense -> indexer warm-up -> sparse
top-k), DSA from scratch, and the local / sink_local / random / oracle selectors, at each k, with
the same steps and learning-rate curve. Writes under `results/recall/`:

    table.md          final answer accuracy (all answers, and the answers whose pair lies outside
                      the local and sink windows), ground-truth hit@k in the recall layer, final
                      validation loss (answer positions only); hit@k and the dense mass from the
                      final checkpoint on 4 validation batches (512 answers), not the 16 of the probe
    accuracy.png      validation answer accuracy vs step, one line per selector, one panel per k
    <run>/            each run's directory (metrics.csv, analysis/, plots/, report.html)

    python experiments/recall/run.py                       # everything (dense + 6 selectors x 2 k)
    python experiments/recall/run.py --k 8 --only dense dsa local
    python experiments/recall/run.py --table-only          # re-read finished runs
    python experiments/recall/run.py --steps 200 60 200    # other step counts (dense, warmup, sparse)
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

from sparse_viz.errors import UserInputError
from sparse_viz.output_dir import refuse_existing_dirs

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



def recall_layer(dense_eval: dict) -> int:
    """The layer whose dense attention puts the most mass on the ground-truth value at the end of
    the dense run (`final_evaluation`): where the model looks the answer up."""
    layers = sorted({int(name[1:].split("/")[0]) for name in dense_eval if name.endswith("/mass")})
    return max(layers, key=lambda layer: dense_eval[f"L{layer}/mass"])


def final_evaluation(run_dir: Path, k: int, sink_tokens: int, batches: int = 4) -> dict:
    """The final checkpoint on `batches` validation batches (512 answers at the default batch 32
    and 4 queries), with the run's own attention:

        far       answer accuracy where the value lies outside both the local window (t - s >= k)
                  and the sink tokens (s >= sink_tokens)
        L<i>/hit  per layer, the share of answers whose value position is in the run's selection
                  (None for dense attention)
        L<i>/oracle_hit, L<i>/mass   the same for the top-k of the dense attention, and the
                  dense attention's head-mean mass on the value position
        L<i>/index_top1, L<i>/dense_top1   whether the value is THE highest-scoring causal key of
                  the indexer (runs with one), and of the dense attention: with k >= the number of
                  pairs, a selection of every value token hits for any query, so hit@k alone
                  does not show that the indexer tells the pairs apart; its top-1 does
    """
    import torch
    import yaml

    from sparse_viz.data import RecallDataModule
    from sparse_viz.model.selectors import select_keys
    from sparse_viz.tracking.ground_truth import VALUE, answer_rows, ground_truth_hits, ground_truth_mass
    from sparse_viz.training import DSALightningModule
    from sparse_viz.training.batches import split_batch

    module = DSALightningModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = RecallDataModule(**config["data"]["init_args"])
    attention = module.schedule.stages[-1].attention
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, values, where) -> None:
        sums[name] = sums.get(name, 0.0) + float(values[where].float().sum())
        counts[name] = counts.get(name, 0) + int(where.sum())

    loader = iter(data.val_dataloader())
    with torch.no_grad():
        for _ in range(batches):
            batch = next(loader, None)
            if batch is None:
                break
            inputs, targets, mask = split_batch(batch)
            out = module.model(inputs, attention=attention, trace="full")
            gt = batch["ground_truth"]  # (B, T, 2)
            answers = answer_rows(gt)  # (B, T)
            t = torch.arange(inputs.shape[1])[None, :]
            outside = (t - gt[..., VALUE] >= k) & (gt[..., VALUE] >= sink_tokens)
            future = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).triu(1)  # (T, T), for every layer
            add("far", out.logits.argmax(-1) == targets, mask & outside)
            for layer, trace in enumerate(out.traces):
                add(f"L{layer}/mass", ground_truth_mass(trace.dense_attn_probs, gt)[..., VALUE], answers)
                oracle = select_keys("oracle", top_k=k, seq_len=inputs.shape[1], dense_probs=trace.dense_attn_probs)
                add(f"L{layer}/oracle_hit", ground_truth_hits(oracle, gt)[..., VALUE], answers)
                if trace.selected is not None:
                    add(f"L{layer}/hit", ground_truth_hits(trace.selected, gt)[..., VALUE], answers)
                dense_top1 = trace.dense_attn_probs.sum(1).argmax(-1)  # (B, T) future probabilities are 0
                add(f"L{layer}/dense_top1", dense_top1 == gt[..., VALUE], answers)
                if trace.index_scores is not None:
                    index_top1 = trace.index_scores.masked_fill(future, float("-inf")).argmax(-1)  # (B, T)
                    add(f"L{layer}/index_top1", index_top1 == gt[..., VALUE], answers)
    return {name: sums[name] / counts[name] if counts[name] else float("nan") for name in sums} | {"answers": counts.get("L0/mass", 0)}


def fmt(value, digits=3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def write_table(ks: list[int], selectors: list[str]) -> Path:
    import yaml

    rows = [("dense", None)] + [(s, k) for k in ks for s in selectors]
    evaluations = {}
    for selector, k in rows:
        run_dir = OUT / run_name(selector, k)
        if (run_dir / "checkpoints" / "last.ckpt").is_file() and metric_rows(run_dir):
            model_args = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
            model_args = model_args.get("init_args", model_args)  # the CLI's subclass mode nests them
            top_k = k if k is not None else int(model_args["top_k"])
            evaluations[(selector, k)] = final_evaluation(run_dir, top_k, int(model_args["sink_tokens"]))
    layer = recall_layer(evaluations[("dense", None)]) if ("dense", None) in evaluations else 1
    answers = next(iter(evaluations.values()))["answers"] if evaluations else 0
    lines = [
        f"Recall layer (most dense attention on the ground-truth value in the dense run): layer {layer}. "
        f"hit@k, oracle hit@k and mass: final checkpoint, {answers} answers of the validation set.",
        "",
        "| run | selector | k | step | accuracy | accuracy, pair outside window | hit@k (recall layer) | "
        "oracle hit@k | indexer top-1 on value | dense top-1 on value | dense mass on value | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for selector, k in rows:
        if (selector, k) not in evaluations:
            continue
        final = metric_rows(OUT / run_name(selector, k))[-1]
        ev = evaluations[(selector, k)]
        lines.append(
            f"| {run_name(selector, k)} | {selector} | {k if k is not None else 'all'} | {int(final['step']) + 1} "
            f"| {fmt(float(final['val/accuracy']))} | {fmt(ev['far'])} | {fmt(ev.get(f'L{layer}/hit'))} "
            f"| {fmt(ev.get(f'L{layer}/oracle_hit'))} | {fmt(ev.get(f'L{layer}/index_top1'))} "
            f"| {fmt(ev.get(f'L{layer}/dense_top1'))} | {fmt(ev.get(f'L{layer}/mass'))} "
            f"| {float(final['val/loss']):.4f} |")
    table = OUT / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def plot_accuracy(ks: list[int], selectors: list[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import yaml

    fig = Figure(figsize=(6 * len(ks), 4.2), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    phases = []  # the length curriculum's (first batch, last batch, seq_len), from the dense run's config
    if (OUT / "dense" / "config.yaml").is_file():
        data_args = yaml.safe_load((OUT / "dense" / "config.yaml").read_text())["data"]
        start = 0
        for length, batches in (data_args.get("init_args", data_args).get("curriculum") or []):
            phases.append((start, start + batches, length))
            start += batches
    for ax, k in zip(axes, ks):
        for first, last, length in phases:
            ax.axvspan(first, last, color="#f2f4f7", zorder=0)
            ax.text((first + last) / 2, 0.5, f"training at T = {length}\n(validation always at full length)",
                    ha="center", va="center", fontsize=8, color="#667085")
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
    selectors = [s for s in SELECTORS if s in args.only]
    jobs = ([("dense", None)] if "dense" in args.only else []) + [(s, k) for k in args.k for s in selectors]
    if not args.table_only:
        try:  # a run directory is never trained into twice (sparse_viz.train refuses too, but after others ran)
            refuse_existing_dirs([OUT / run_name(selector, k) for selector, k in jobs])
        except UserInputError as error:
            parser.exit(2, f"{parser.prog}: error: {error} (or give --table-only)\n")
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
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
