"""Impact agreement: does the Lightning Indexer pick the keys that matter, and better than attention mass?

For every layer and every query of a held-out passage, the exact all-pairs impact (the change of
the attention block's output when one key alone is hidden from one query) is compared with each
selection of k keys: the indexer's top-k, the attention-mass top-k (DSA's oracle), local,
sink_local and random (`python -m sparse_viz.analysis impact`).

1. The default DSA run (`python -m sparse_viz.train`, trained here unless --run is given), read
   from its checkpoint with DENSE attention, so that every key can matter (under its own sparse
   attention only its selected keys could), on 256 tokens of Julius Caesar (a validation play).
2. SmolLM2-135M (no indexer: attention mass against the training-free selectors) on 512 tokens
   of the same play, for scale.

    python experiments/impact_agreement/run.py                   # ~5 min training + ~2 min analyses on 2 cores
    python experiments/impact_agreement/run.py --run results/<run>  # an existing DSA run
    python experiments/impact_agreement/run.py --only smollm2    # one part
    python experiments/impact_agreement/run.py --table-only      # re-read finished analyses

Writes results/impact_agreement/{dsa,smollm2}/ (the analyses' own outputs) and table.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "impact_agreement"
PLAY = "julius-caesar"
K = [8, 16, 32, 64]


def held_out_passage(tokenizer, n_tokens: int, start_char: int = 20000) -> str:
    """n_tokens of a validation play (never trained on), cut on the given tokenizer."""
    from sparse_viz.data.corpus import load_shakespeare

    play = next(d for d in load_shakespeare().val if d.name == PLAY)
    ids = tokenizer(play.text[start_char:start_char + 20 * n_tokens])["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def train_default_run() -> Path:
    """The default DSA run, trained to the end of its schedule (an interrupted one is resumed)."""
    import torch

    from sparse_viz.training.module import default_stages

    run = OUT / "dsa-default"
    last = run / "checkpoints" / "last.ckpt"
    total = sum(stage.steps for stage in default_stages())
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.is_file() else 0
    if step < total:
        command = [sys.executable, "-m", "sparse_viz.train", "--run_root", str(OUT), "--run_name", "dsa-default"]
        if step:
            command += ["--ckpt_path", str(last)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
    return run


def analyse(name: str, model_path: str, n_tokens: int, attention: str) -> pd.DataFrame:
    from sparse_viz.analysis.impact.experiment import run_impact_analysis
    from sparse_viz.analysis.impact.outputs import write_impact_outputs
    from sparse_viz.pretrained.loading import load_model

    loaded = load_model(model_path, device="cpu", attention=attention)
    prompt = held_out_passage(loaded.tokenizer, n_tokens)
    result = run_impact_analysis(prompt, model=loaded, k=K, progress=True)
    write_impact_outputs(OUT / name, result, overwrite=True)  # this script's own earlier result, nothing else
    return result.agreement


def summary(agreement: pd.DataFrame) -> str:
    """Mean over layers of each selector's agreement, per k; then the indexer - attention mass gap per layer."""
    lines = ["| k | selector | impact-recall@k | impact share | Spearman |", "|---|---|---|---|---|"]
    means = agreement.groupby(["k", "selector"])[["impact_recall_at_k", "impact_share", "spearman"]].mean()
    for (k, selector), row in means.iterrows():
        spearman = "–" if pd.isna(row["spearman"]) else f"{row['spearman']:.3f}"
        lines.append(f"| {k} | {selector} | {row['impact_recall_at_k']:.3f} | {row['impact_share']:.3f} | {spearman} |")
    if "indexer" in set(agreement["selector"]):
        lines += ["", "Per layer, k = 32: impact-recall@k (Spearman) of the indexer vs the attention mass", "",
                  "| layer | indexer | attention mass | local |", "|---|---|---|---|"]
        part = agreement[agreement["k"] == 32].set_index(["layer", "selector"])
        for layer in sorted(agreement["layer"].unique()):
            cell = {s: part.loc[(layer, s)] for s in ("indexer", "attention_mass", "local")}
            lines.append(f"| {layer} | {cell['indexer']['impact_recall_at_k']:.3f} ({cell['indexer']['spearman']:.3f}) "
                         f"| {cell['attention_mass']['impact_recall_at_k']:.3f} ({cell['attention_mass']['spearman']:.3f}) "
                         f"| {cell['local']['impact_recall_at_k']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="an existing DSA run directory (default: train one)")
    parser.add_argument("--smollm2", default=str(REPO / ".cache" / "smollm2-135m"))
    parser.add_argument("--only", nargs="+", choices=("dsa", "smollm2"), default=["dsa", "smollm2"])
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        if "dsa" in args.only:
            run = args.run or train_default_run()
            analyse("dsa", str(run / "checkpoints" / "last.ckpt"), 256, attention="dense")
        if "smollm2" in args.only:
            analyse("smollm2", args.smollm2, 512, attention="own")
    parts = []
    for name, title in (("dsa", "DSA default run (dense attention), 256 tokens"), ("smollm2", "SmolLM2-135M, 512 tokens")):
        table = OUT / name / "agreement.csv"
        if table.is_file():
            parts.append(f"### {title}\n\n{summary(pd.read_csv(table))}\n")
    (OUT / "table.md").write_text("\n".join(parts))
    print((OUT / "table.md").read_text())


if __name__ == "__main__":
    main()
