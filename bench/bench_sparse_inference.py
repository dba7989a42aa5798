"""Sparse inference with caches vs the same model with SDPA and a KV cache: decode and prefill.

    python bench/bench_sparse_inference.py --contexts 2048 4096 8192 --batch 1 8 --prefill-lens 2048 4096

SmolLM2-135M (`.cache/smollm2-135m`, converted by `scripts/setup.sh --dev`) with 30 Lightning
Indexers (4 heads x 64, randomly initialised: the cost does not depend on what they learned),
k = 256. Candidates, each measured in a fresh process, interleaved over rounds:

- `dense`: the model's own SDPA attention and transformers' DynamicCache;
- `topk`: `sparse_inference` (fused top-k and sparse attention in a prefill; in a decode step the
  indexer's scores against its key cache, top-k, attention over k rows of the KV cache).

Decode: a preallocated KV cache (transformers' StaticCache, as long as the context and the steps:
DynamicCache copies itself whole at every step, dense and sparse alike) and the indexer key
cache are filled with random rows of the context's length, then `--decode-steps` single-token
forwards are timed (the contents do not change the
cost: dense reads every row, sparse reads k). Prefill: one forward over `--prefill-lens` random
tokens with an empty cache. Memory: peak RSS of the process. Every line is a ratio to dense
measured in the same run.
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

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".cache" / "smollm2-135m"
CANDIDATES = ("dense", "topk")


def worker(candidate: str, mode: str, length: int, batch: int, steps: int, threads: int, dtype: str, k: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    from sparse_viz.pretrained.adapter import ArchitectureAdapter
    from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers
    from sparse_viz.pretrained.selected_attention import KeySelection
    from sparse_viz.pretrained.sparse_inference import IndexerKeyCache, install_sparse_inference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype_ = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype_, attn_implementation="sdpa").eval()
    adapter = ArchitectureAdapter.for_model(model)
    state = None
    if candidate == "topk":
        indexers = RetrofitIndexers.for_model(adapter).to(dtype_).eval()
        selection = KeySelection("topk", top_k=k, indexers=indexers, indexer_rope_dim=indexers.settings["rope_dim"],
                                 indexer_rope_theta=indexers.settings["rope_theta"])
        state = install_sparse_inference(model, selection)
    vocab = model.config.vocab_size
    times = []
    with torch.no_grad():
        if mode == "prefill":
            ids = torch.randint(vocab, (batch, length))
            for _ in range(steps + 1):  # the first is a warm-up
                started = time.perf_counter()
                # Logits of the last position only, as `generate` asks (all 8192 x 49152 would
                # cost more than the attention being compared).
                model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                      logits_to_keep=1)
                times.append(time.perf_counter() - started)
        else:
            # Preallocated: DynamicCache appends with torch.cat, copying the whole cache every step,
            # which costs dense and sparse alike and hides what attention reads.
            cache = StaticCache(config=model.config, max_cache_len=length + steps + 2)
            hkv, hd = adapter.n_kv_heads, adapter.head_dim
            for layer in range(adapter.n_layers):
                cache.update(torch.randn(batch, hkv, length, hd, dtype=dtype_),
                             torch.randn(batch, hkv, length, hd, dtype=dtype_), layer)
                if state is not None:
                    state.indexer_keys[layer] = IndexerKeyCache()
                    state.indexer_keys[layer].reset(torch.randn(batch, length, indexers.settings["dim"], dtype=dtype_))
            token = torch.randint(vocab, (batch, 1))
            for _ in range(steps + 1):
                started = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - started)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"times": times[1:], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__}


def run_worker(candidate, mode, length, batch, steps, threads, dtype, k) -> dict:
    command = [sys.executable, __file__, "--worker", candidate, mode, str(length), str(batch), "--decode-steps",
               str(steps), "--threads", str(threads), "--dtype", dtype, "--k", str(k)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096, 8192], help="decode at these contexts")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--prefill-lens", type=int, nargs="*", default=[2048], help="prefill these lengths (batch 1)")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps (prefill: timed forwards)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        candidate, mode, length, batch = args.worker
        steps = args.decode_steps if mode == "decode" else 1
        print(json.dumps(worker(candidate, mode, int(length), int(batch), steps, args.threads, args.dtype, args.k)))
        return
    sys.path.insert(0, str(REPO / "bench"))
    from timing import print_cpu

    print_cpu()
    jobs = [("decode", T, B) for T in args.contexts for B in args.batch] + [("prefill", T, 1) for T in args.prefill_lens]
    results = {(job, c): [] for job in jobs for c in CANDIDATES}
    started = time.time()
    for round_ in range(args.rounds):
        for job in jobs:
            order = CANDIDATES if round_ % 2 == 0 else CANDIDATES[::-1]
            for candidate in order:
                mode, T, B = job
                run = run_worker(candidate, mode, T, B, args.decode_steps, args.threads, args.dtype, args.k)
                results[(job, candidate)].append(run)
                print(f"  [round {round_ + 1}] {mode} T={T} B={B} {candidate}: median "
                      f"{statistics.median(run['times']) * 1000:.1f} ms, peak {run['peak_mb']:.0f} MB", flush=True)
    print(f"SmolLM2-135M, {args.dtype}, k={args.k}, {args.threads} thread(s), {args.rounds} rounds, one fresh process "
          f"per measurement; wall {time.time() - started:.0f} s")
    crossover = {}
    for job in jobs:
        mode, T, B = job
        medians = {c: statistics.median(t for run in results[(job, c)] for t in run["times"]) for c in CANDIDATES}
        peaks = {c: max(run["peak_mb"] for run in results[(job, c)]) for c in CANDIDATES}
        ratio = medians["topk"] / medians["dense"]
        unit = "per token" if mode == "decode" else "per forward"
        print(f"{mode:7s} T={T:6d} batch {B}: dense {medians['dense'] * 1000:8.1f} ms, topk {medians['topk'] * 1000:8.1f} ms "
              f"{unit}: topk/dense time {ratio:.2f}x, peak RSS {peaks['topk'] / peaks['dense']:.2f}x")
        if mode == "decode" and ratio < 1 and B not in crossover:
            crossover[B] = T
    for B in args.batch:
        where = f"from context {crossover[B]}" if B in crossover else "at no measured context"
        print(f"crossover, decode batch {B}: topk faster than dense {where}")


if __name__ == "__main__":
    main()
