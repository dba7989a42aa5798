"""Retrofit DSA onto SmolLM2-135M: how much quality survives top-k attention chosen by indexers
trained on the frozen model, against the training-free selectors and the oracle?

1. Warm-up (`python -m sparse_viz.train --config configs/train/retrofit_smollm2.yaml`), capped at
   `--minutes` of wall time on this CPU (the issue's budget: 20), unless `--run` names a finished run.
2. `python -m sparse_viz.analysis sparse-eval --indexers <run>/checkpoints/last.ckpt`: held-out
   perplexity (4 windows of 1024 tokens of Shakespeare's validation plays, never trained on) for
   dense, topk, local, sink_local, random and oracle at k in {16, 32, 64, 128}, and per-layer
   mass@k / recall@k of each selection against the model's own dense attention.

    python experiments/retrofit_smollm2/run.py                        # ~20 min warm-up + ~15 min evaluation
    python experiments/retrofit_smollm2/run.py --run results/<run>    # evaluate an existing run
    python experiments/retrofit_smollm2/run.py --table-only           # re-read a finished evaluation

Writes results/retrofit_smollm2/{<run>/, sparse-eval/, table.md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "retrofit_smollm2"
MODEL = REPO / ".cache" / "smollm2-135m"
K = [16, 32, 64, 128]


def warm_up(minutes: int, steps: int) -> Path:
    run = OUT / "warmup"
    if not (run / "checkpoints" / "last.ckpt").is_file():
        command = [sys.executable, "-m", "sparse_viz.train", "--config", "configs/train/retrofit_smollm2.yaml",
                   "--run_root", str(OUT), "--run_name", "warmup", f"--trainer.max_time=00:00:{minutes:02d}:00",
                   f"--model.stages=[{{name: warmup, steps: {steps}, indexer_lr: 2.0e-3, warmup_steps: 5, "
                   f"min_lr_ratio: 0.1}}]", "--trainer.val_check_interval=30", "--trainer.log_every_n_steps=1",
                   "--trainer.callbacks.every_n_steps=30"]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
    return run


def evaluate(run: Path) -> Path:
    output = OUT / "sparse-eval"
    command = [sys.executable, "-m", "sparse_viz.analysis", "sparse-eval", "--model", str(MODEL), "--indexers",
               str(run / "checkpoints" / "last.ckpt"), "--k", *map(str, K), "--output", str(output), "--device", "cpu",
               "--overwrite"]  # this script's own earlier evaluation (a folder holding anything else is refused)
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return output


def table(output: Path, run: Path) -> str:
    """Perplexity relative to dense per selector and k, the weakest layers of topk at k = 64,
    and what the warm-up did (steps, KL before/after)."""
    perplexity = pd.read_csv(output / "perplexity.csv")
    dense = float(perplexity.loc[perplexity.selector == "dense", "perplexity"].iloc[0])
    wide = perplexity[perplexity.selector != "dense"].pivot(index="k", columns="selector", values="relative_to_dense")
    order = [c for c in ["topk", "oracle", "sink_local", "local", "random"] if c in wide.columns]
    lines = [f"dense perplexity {dense:.2f}; relative to dense:", "",
             "| k | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for k, row in wide[order].iterrows():
        lines.append(f"| {k} | " + " | ".join(f"{row[c]:.3f}" for c in order) + " |")
    layers = pd.read_csv(output / "coverage.csv")
    at64 = layers[(layers.k == 64) & layers.selector.isin(["topk", "oracle", "sink_local"])]
    mass = at64.pivot(index="layer", columns="selector", values="mass_at_k")
    if "topk" in mass:
        weakest = mass.sort_values("topk").head(6)
        lines += ["", "mass@64 of the dense attention kept, the six weakest layers of topk:", "",
                  "| layer | topk | oracle | sink_local |", "|---|---|---|---|"]
        lines += [f"| {layer} | {r['topk']:.3f} | {r['oracle']:.3f} | {r['sink_local']:.3f} |"
                  for layer, r in weakest.iterrows()]
        lines.append(f"\nmean mass@64 over layers: topk {mass['topk'].mean():.3f}, oracle {mass['oracle'].mean():.3f}, "
                     f"sink_local {mass['sink_local'].mean():.3f}")
    metrics = pd.read_csv(run / "metrics.csv")
    kl = metrics[["step", "train/indexer_kl"]].dropna()
    if len(kl):
        lines.append(f"\nwarm-up: {int(kl.step.max()) + 1} steps of 1024 tokens; mean indexer KL per layer "
                     f"{kl['train/indexer_kl'].iloc[0]:.3f} (step 0) -> {kl['train/indexer_kl'].tail(5).mean():.3f} "
                     f"(mean of the last 5 steps)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="an existing retrofit run directory")
    parser.add_argument("--minutes", type=int, default=20, help="wall-time cap of the warm-up")
    parser.add_argument("--steps", type=int, default=60, help="warm-up steps (the LR schedule's length)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    run = args.run or OUT / "warmup"
    if not args.table_only:
        run = args.run or warm_up(args.minutes, args.steps)
        evaluate(run)
    text = table(OUT / "sparse-eval", run)
    (OUT / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
