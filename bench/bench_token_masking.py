"""Token masking on SmolLM2-135M: the fast path against seed 000's method and a plain forward.

    python bench/bench_token_masking.py [--model .cache/smollm2-135m] [--tokens 128] [--reps 3]
                                        [--threads N] [--device cpu]

One step, all 30 layers, every key position of a 128-token prompt. Measured side by side in one
run, repetitions interleaved, medians reported:
- fast:   `analyse_sequence(method="fast")`: one baseline forward (layer inputs captured by
          pre-hooks), then per layer all single-key masks of the final query in one batch;
- seed:   `analyse_sequence(method="reference")`: seed 000's method, cached layer inputs and
          one full layer pass per masked token (T+1 passes per layer);
- plain:  one ordinary `model(input_ids)` forward (logits for every position, as HF returns
          by default), and the same with `logits_to_keep=1`.
Goals (set when the fast path was built): seed / fast >= 34, fast / plain <= 2.5.

It also prints a finding: which masked token moves each layer's update the most.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sparse_viz.analysis.masking.experiment import analyse_sequence
from sparse_viz.pretrained.loading import load_model

from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, long after the ships had "
    "stopped needing his lamp. He carried a small notebook in which he wrote the colour of the sky, "
    "the direction of the wind and the names of the birds he saw. His daughter, who lived in the "
    "city and worked as an engineer, visited him twice a year. She tried to convince him that the "
    "automatic beacon would do the job just as well, but he only smiled and said that a machine "
    "could not tell whether the sea was angry or merely restless. One winter a storm cut the power "
    "to the whole coast for three days. The automatic beacon went dark, and the fishermen who were "
    "still out at sea steered home by the light of an oil lamp burning at the top of the tower. "
    "When the power came back, nobody spoke of replacing the keeper again."
)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).is_dir():
        sys.exit(f"bench: {args.model} not found; run `python -m sparse_viz.pretrained.smollm2` first")

    loaded = load_model(args.model, device=args.device, dtype="float32")
    model, adapter = loaded.model, loaded.adapter
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, : args.tokens].to(loaded.device)  # (1, T)
    n_tokens = ids.shape[1]
    assert n_tokens == args.tokens, f"the bench text has only {n_tokens} tokens"
    print(
        f"SmolLM2-135M, {loaded.device}, float32, {torch.get_num_threads()} thread(s), T={n_tokens}, "
        f"{adapter.n_layers} layers x {n_tokens} masked keys, 1 step, {args.reps} interleaved reps"
    )

    def sync() -> None:
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    results = {}

    def fast() -> None:
        results["fast"] = analyse_sequence(adapter, ids, method="fast")
        sync()

    def seed() -> None:
        results["seed"] = analyse_sequence(adapter, ids, method="reference")
        sync()

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        sync()

    def plain_last_logits() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync()

    methods = {"fast": fast, "seed": seed, "plain": plain, "plain_last_logits": plain_last_logits}
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.reps):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"  {name:18s} median {value * 1000:9.1f} ms   (runs: {', '.join(f'{t * 1000:.0f}' for t in times[name])})")
    print(f"layer pass per token / fast    = {median['seed'] / median['fast']:6.1f}x   (goal >= 34)")
    print(f"fast / plain forward            = {median['fast'] / median['plain']:6.2f}x   (goal <= 2.5)")
    print(f"fast / plain forward (last logits only) = {median['fast'] / median['plain_last_logits']:6.2f}x")

    fast_result, seed_result = results["fast"], results["seed"]
    difference = abs(fast_result.l2 - seed_result.l2).max() / seed_result.l2.max()
    print(f"max |fast - seed| l2 distance / max l2 = {difference:.2e}")

    print("\nfinding: masked token with the largest Full l2 distance, per layer")
    tokens = [loaded.tokenizer.decode([i]) for i in ids[0].tolist()]
    full_l2 = fast_result.l2[:, :, 0]  # (L, T) variant 0 = Full
    for layer in range(adapter.n_layers):
        top = full_l2[layer].argsort()[::-1][:3]
        shown = ", ".join(f"{p}:{tokens[p]!r} {full_l2[layer, p]:.2f}" for p in top)
        print(f"  layer {layer:2d}: {shown}")


if __name__ == "__main__":
    main()
