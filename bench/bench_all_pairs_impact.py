"""All-pairs attention impact on SmolLM2-135M against plain forwards: time and peak memory.

    python bench/bench_all_pairs_impact.py [--model .cache/smollm2-135m] [--tokens 512 1024]
                                           [--reps 2] [--threads 2] [--block-size 64]

For each length T, two candidates, each in its own fresh process (so peak RSS is its own):
- forward: `--reps` plain forwards of the model (logits for every position);
- impact:  one baseline forward capturing every layer's input, then the all-pairs impact of all
           30 layers (`all_pairs_attention_impact`), `--reps` times.
Each process reports its median wall time per repetition and its peak RSS (ru_maxrss); the
parent prints impact / forward. Goal: <= 2 forwards in time and <= 4 GB peak at T = 512.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)

TEXT = (Path(__file__).resolve().parent / "bench_token_masking.py").read_text()  # any long English text


def child(args: argparse.Namespace) -> None:
    import torch

    from sparse_viz.analysis.masking.all_pairs import all_pairs_attention_impact
    from sparse_viz.analysis.masking.layer_inputs import capture_layer_inputs
    from sparse_viz.pretrained.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    ids = loaded.tokenizer(TEXT * 8, return_tensors="pt")["input_ids"][:, : args.length]
    assert ids.shape[1] == args.length, ids.shape

    def forward() -> None:
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False)

    def impact() -> None:
        inputs, _ = capture_layer_inputs(loaded.adapter, ids)
        for layer in range(loaded.adapter.n_layers):
            all_pairs_attention_impact(loaded.adapter, layer, inputs[layer], block_size=args.block_size)

    run = forward if args.child == "forward" else impact
    times = []
    for _ in range(args.reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": statistics.median(times), "best": min(times), "peak_gb": peak_kb / 2**20}))


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--child", choices=("forward", "impact"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"SmolLM2-135M, all 30 layers, torch threads {args.threads}, block {args.block_size}, reps {args.reps}")
    for length in args.tokens:
        results = {}
        for candidate in ("forward", "impact"):
            command = [sys.executable, __file__, "--child", candidate, "--length", str(length), "--model", args.model,
                       "--reps", str(args.reps), "--threads", str(args.threads), "--block-size", str(args.block_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[candidate] = json.loads(out)
        f, i = results["forward"], results["impact"]
        print(f"T={length}: forward {f['seconds']:.2f} s (peak {f['peak_gb']:.2f} GB), "
              f"impact {i['seconds']:.2f} s (peak {i['peak_gb']:.2f} GB): "
              f"impact / forward = {i['seconds'] / f['seconds']:.2f}x median, {i['best'] / f['best']:.2f}x best")


if __name__ == "__main__":
    main()
