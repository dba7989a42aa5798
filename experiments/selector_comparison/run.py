"""Selector comparison: the DSA default against dense attention and the baseline selectors.

Trains `configs/train/{default,dense,local,sink_local,random,oracle}.yaml` (same model, data, step
count and learning-rate curve) and writes `results/selector_comparison/table.md`: final
validation loss (with each model's own attention) and, on the fixed probe, the dense-attention
mass each selection keeps.

    python experiments/selector_comparison/run.py                 # all six, ~3 min each on 2 CPU cores
    python experiments/selector_comparison/run.py --only default dense
    python experiments/selector_comparison/run.py --table-only    # re-read finished runs
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["default", "dense", "local", "sink_local", "random", "oracle"]
OUT = REPO / "results" / "selector_comparison"


def final_val_loss(run_dir: Path) -> tuple[int, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["val/loss"])


def last_snapshot(run_dir: Path) -> dict:
    lines = (run_dir / "analysis" / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_table(names: list[str]) -> Path:
    dense_loss = final_val_loss(OUT / "dense")[1] if (OUT / "dense" / "metrics.csv").is_file() else None
    lines = [
        "| config | step | val loss | vs dense | mass@k of its selection | local | random | oracle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        run_dir = OUT / name
        if not (run_dir / "metrics.csv").is_file():
            continue
        step, loss = final_val_loss(run_dir)
        snap = last_snapshot(run_dir)
        ratio = f"{100 * (loss / dense_loss - 1):+.2f}%" if dense_loss else "–"
        own = {"default": snap.get("mass_at_k"), "dense": 1.0}.get(name, snap.get(f"mass_at_k_{name}"))
        lines.append(
            f"| {name} | {step + 1} | {loss:.4f} | {ratio} | {fmt(own)} | {fmt(snap.get('mass_at_k_local'))} "
            f"| {fmt(snap.get('mass_at_k_random'))} | {fmt(snap.get('mass_at_k_oracle'))} |"
        )
    table = OUT / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for name in args.only:
            command = [sys.executable, "-m", "sparse_viz.train", "--config", str(REPO / "configs" / "train" / f"{name}.yaml"),
                       "--run_root", str(OUT), "--run_name", name]
            if name == "default":
                command[3:5] = []  # the embedded default is the base config already
            print("$", " ".join(command), flush=True)
            subprocess.run(command, cwd=REPO, check=True)
    print(write_table(args.only).read_text())


if __name__ == "__main__":
    main()
