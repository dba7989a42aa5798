"""Selector comparison: the DSA default against dense attention and the baseline selectors.

Trains `configs/train/{default,dense,local,sink_local,random,oracle}.yaml` (same model, data, step
count and learning-rate curve) and writes `results/selector_comparison/table.md`: final
validation loss (with each model's own attention) and, on the fixed probe, the dense-attention
mass each selection keeps.

    python experiments/selector_comparison/run.py                 # all six, ~3 min each on 2 CPU cores
    python experiments/selector_comparison/run.py --only default dense
    python experiments/selector_comparison/run.py --table-only    # re-read finished runs
    python experiments/selector_comparison/run.py --long          # the same at T = 4096 (long.yaml)
    python experiments/selector_comparison/run.py --long --same-init --only default dense local
    python experiments/selector_comparison/run.py --long --same-init --only default dense local --seed 1
    python experiments/selector_comparison/run.py --long --same-init --only dsa_warmup60 dsa_no_warmup

`--long` layers `configs/train/long.yaml` (T = 4096, k = 256, a 2-layer d_model 64 model, 400
steps: dense 150 -> warm-up 20 -> sparse 230) under every config, gives the baselines the same
steps and learning-rate curve (dense 170, then dense or sparse 230), runs two configs at a time
on one torch thread each, and writes `results/selector_comparison_long/table.md`. Its probe is
the first 1024 positions of 2 validation sequences (long.yaml says why), so the mass@k columns
describe queries 0..1023.

`--same-init` gives the baselines a Lightning Indexer too (trained alongside, never selecting),
so that every run starts from the DSA run's initial weights: without one, the main model's
weights are drawn from a different point of the random stream (the indexers are built between
the layers). Results go to `results/selector_comparison_long_same_init/` (`default` there is
the same DSA run as without the flag).

`--seed N` runs every config from seed N (`--seed_everything`: other initial weights and data
order; the configs' own seed is 0) into a directory of its own, `..._seed{N}`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sparse_viz.errors import UserInputError
from sparse_viz.output_dir import refuse_existing_dirs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["default", "dense", "local", "sink_local", "random", "oracle"]
OUT = REPO / "results" / "selector_comparison"
LONG_STAGES = {  # long.yaml's recipe; the baselines get its steps and learning-rate curve
    "dense": "[{name: dense, steps: 170, lr: 3.0e-3, warmup_steps: 15, min_lr_ratio: 1.0},"
             " {name: dense, steps: 230, lr: 3.0e-3, min_lr_ratio: 0.1}]",
    "baseline": "[{name: dense, steps: 170, lr: 3.0e-3, warmup_steps: 15, min_lr_ratio: 1.0},"
                " {name: sparse, steps: 230, lr: 3.0e-3, min_lr_ratio: 0.1}]",
}
# DSA with another recipe at T = 4096 (`--long` only), the same 400 steps: where does its loss go at
# the switch? A 60-step warm-up instead of 20 (the main model frozen longer), or none (dense 170,
# the indexer learning alongside, then sparse 230: the baselines' schedule).
LONG_DSA_VARIANTS = {
    "dsa_warmup60": "[{name: dense, steps: 150, lr: 3.0e-3, indexer_lr: 1.0e-3, warmup_steps: 15, min_lr_ratio: 1.0},"
                    " {name: warmup, steps: 60, indexer_lr: 1.0e-3, min_lr_ratio: 1.0},"
                    " {name: sparse, steps: 190, lr: 3.0e-3, indexer_lr: 5.0e-4, min_lr_ratio: 0.1}]",
    "dsa_no_warmup": "[{name: dense, steps: 170, lr: 3.0e-3, indexer_lr: 1.0e-3, warmup_steps: 15, min_lr_ratio: 1.0},"
                     " {name: sparse, steps: 230, lr: 3.0e-3, indexer_lr: 5.0e-4, min_lr_ratio: 0.1}]",
}


def train_command(name: str, long: bool, same_init: bool = False, seed: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "sparse_viz.train"]
    if long:
        command += ["--config", str(REPO / "configs" / "train" / "long.yaml")]
    if name in LONG_DSA_VARIANTS:  # long.yaml's DSA model with another recipe
        command.append(f"--model.stages={LONG_DSA_VARIANTS[name]}")
    elif name != "default":  # the embedded default is the base config already
        command += ["--config", str(REPO / "configs" / "train" / f"{name}.yaml")]
        if long:
            command.append(f"--model.stages={LONG_STAGES['dense' if name == 'dense' else 'baseline']}")
        if same_init:
            command.append("--model.use_indexer=true")
    if seed is not None:
        command += ["--seed_everything", str(seed)]
    return command + ["--run_root", str(OUT), "--run_name", name]


def train(name: str, long: bool, same_init: bool = False, seed: int | None = None) -> None:
    command = train_command(name, long, same_init, seed)
    print(f"$ {' '.join(command)}", flush=True)  # one write: two threads print
    if not long:
        subprocess.run(command, cwd=REPO, check=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two at a time on 2 cores
    started = time.time()
    with open(OUT / f"{name}.log", "w") as log:
        subprocess.run(command + ["--trainer.enable_progress_bar=false"], cwd=REPO, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    (OUT / f"{name}.seconds").write_text(f"{time.time() - started:.1f}\n")


def probe_share(name: str) -> str:
    """The tracking callback's share of a run's wall time: its snapshots' seconds / the run's."""
    seconds = OUT / f"{name}.seconds"
    history = OUT / name / "analysis" / "history.jsonl"
    if not seconds.is_file() or not history.is_file():
        return "–"
    snapshots = sum(json.loads(line).get("snapshot_seconds") or 0.0 for line in history.read_text().splitlines())
    wall = float(seconds.read_text())
    return f"{wall / 60:.1f} min, {100 * snapshots / wall:.1f}%"


def final_val_loss(run_dir: Path) -> tuple[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["val/loss"])


def last_snapshot(run_dir: Path) -> dict:
    lines = (run_dir / "analysis" / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_table(names: list[str], long: bool = False) -> Path:
    dense_loss = final_val_loss(OUT / "dense")[1] if (OUT / "dense" / "metrics.csv").is_file() else None
    lines = [
        "| config | step | val loss | vs dense | mass@k of its selection | local | random | oracle |"
        + (" wall time, probe share |" if long else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if long else ""),
    ]
    for name in names:
        run_dir = OUT / name
        if not (run_dir / "metrics.csv").is_file():
            continue
        step, loss = final_val_loss(run_dir)
        snap = last_snapshot(run_dir)
        ratio = f"{100 * (loss / dense_loss - 1):+.2f}%" if dense_loss else "–"
        if name == "default" or name in LONG_DSA_VARIANTS:  # the indexer's own selection
            own = snap.get("mass_at_k")
        else:
            own = 1.0 if name == "dense" else snap.get(f"mass_at_k_{name}")
        lines.append(
            f"| {name} | {step + 1} | {loss:.4f} | {ratio} | {fmt(own)} | {fmt(snap.get('mass_at_k_local'))} "
            f"| {fmt(snap.get('mass_at_k_random'))} | {fmt(snap.get('mass_at_k_oracle'))} |"
            + (f" {probe_share(name)} |" if long else "")
        )
    table = OUT / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CONFIGS + list(LONG_DSA_VARIANTS), default=CONFIGS,
                        help=f"configs to run (with --long also {', '.join(LONG_DSA_VARIANTS)}: DSA, other recipes)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--long", action="store_true", help="T = 4096 (configs/train/long.yaml), two runs at a time")
    parser.add_argument("--same-init", action="store_true", help="with --long: baselines carry an (unused) indexer, "
                        "so every run starts from the same weights")
    parser.add_argument("--seed", type=int, help="seed every run from this seed (results in a directory of its own)")
    args = parser.parse_args()
    if args.same_init and not args.long:
        parser.error("--same-init goes with --long")
    if not args.long and set(args.only) & set(LONG_DSA_VARIANTS):
        parser.error(f"{', '.join(sorted(set(args.only) & set(LONG_DSA_VARIANTS)))}: T = 4096 recipes, with --long only")
    global OUT
    if args.long:
        OUT = REPO / "results" / ("selector_comparison_long_same_init" if args.same_init else "selector_comparison_long")
    if args.seed is not None:
        OUT = OUT.with_name(f"{OUT.name}_seed{args.seed}")
    if not args.table_only:
        try:  # a run directory is never trained into twice (sparse_viz.train refuses too, but after others ran)
            refuse_existing_dirs([OUT / name for name in args.only])
        except UserInputError as error:
            parser.exit(2, f"{parser.prog}: error: {error} (or give --table-only)\n")
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        with ThreadPoolExecutor(max_workers=2 if args.long else 1) as pool:
            list(pool.map(lambda name: train(name, args.long, args.same_init, args.seed), args.only))
    print(write_table(args.only, args.long).read_text())


if __name__ == "__main__":
    main()
