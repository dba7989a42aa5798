"""Component sweep on SmolLM2-135M: each SVD component of one projection ablated alone.

Two ways to get the same table, timed side by side (interleaved rounds, medians):
    one_per_component  one full forward per component (batch 1, from the embeddings)
    batched+prefix     `batch_size` components per forward, each starting at the module's layer
                       from the all-ones reconstruction's layer input (the default path)
Both tables are checked to agree, then the components with the largest KL are printed.

    python bench/bench_component_sweep.py                       # 15.o_proj:0-63, 64 tokens
    python bench/bench_component_sweep.py --module 2.q_proj --components 0-31 --repeats 3

On a CPU the gain is bounded the same way as the head sweep's (bench_head_sweep.py): the work
after the module's layer must run for every component; batching only saves per-call overhead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_head_sweep import PROMPT
from timing import interleaved_medians, print_cpu

from sparse_viz.analysis.ablation.component_sweep import (
    component_sweep_study,
    sweep_ablations,
)
from sparse_viz.analysis.ablation.decomposition import svd_decomposition
from sparse_viz.pretrained.loading import load_model


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(".cache/smollm2-135m")))
    parser.add_argument("--module", default="15.o_proj")
    parser.add_argument("--components", default="0-63")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, : args.tokens].to(loaded.device)  # (1, T)
    spec = f"{args.module}:{args.components}"
    sweep = sweep_ablations(model, None, [spec])
    decomposition = svd_decomposition(model, [sweep[0].path])
    sweep = sweep_ablations(model, decomposition, [spec])
    print(f"{loaded.name_or_path}: sweeping {len(sweep)} components of {sweep[0].path} (C = "
          f"{decomposition[sweep[0].path].n_components}) on {ids.shape[1]} tokens; device {loaded.device}, "
          f"torch threads {torch.get_num_threads()}")

    tables = {}

    def method(name, **options):
        def run():
            tables[name] = component_sweep_study(model, ids, decomposition, sweep, patterns=False, progress=False,
                                                 **options).table
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    times = interleaved_medians({
        "one_per_component": method("one_per_component", batch_size=1, reuse_prefix=False),
        "batched+prefix": method("batched+prefix", batch_size=args.batch_size, reuse_prefix=True),
    }, args.repeats)
    diff = (tables["one_per_component"]["kl_divergence"] - tables["batched+prefix"]["kl_divergence"]).abs().max()
    print(f"  check: max |KL diff| between the two tables = {diff:.2e}")
    base = times["one_per_component"][0]
    print(f"\nmedian seconds over {args.repeats} repetition(s), {len(sweep)} components:")
    for name, (median, best) in times.items():
        print(f"  {name:>17}: {median:8.2f} s  ({median / len(sweep) * 1000:7.1f} ms/component)   "
              f"speed-up vs one_per_component: {base / median:5.2f}x")
    print("\ncomponents with the largest KL(original || one component removed):")
    top = tables["batched+prefix"].sort_values("kl_divergence", ascending=False).head(8)
    print(top[["ablation", "component_norm", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]].to_string(index=False))


if __name__ == "__main__":
    main()
