"""Attention only: gathered sparse attention vs dense masked sparse attention (same selection).

    python bench/bench_attention.py [--reps 5] [--seq-lens 1024 4096] [--top-k 256] [--backward] [--copy]
    python bench/bench_attention.py --memory --seq-lens 4096 8192 --backward [--threads 1] [--reps 3]

Prints, per sequence length, medians of interleaved repetitions and their ratios against the
masked path measured in the same run, for the fused CPU kernel and the CSR one (`--backward`:
forward + backward; `--copy`: also the plain gathered-copy kernel used off CPU). Goal: gathered >= 2x faster than masked at
T=4096, k=256 on CPU. Fused dense SDPA (no selection at all) is printed for context.

`--memory`: the CSR and fused kernels against fused dense SDPA at long T, time AND peak memory,
each candidate in its own fresh process (peak RSS = `ru_maxrss`, so it is that candidate's own):
one warm-up call then `--reps` timed ones (median, best). Every worker first builds the same
inputs and a top-k selection of a random Lightning Indexer projection by query blocks
(`blockwise_topk`, no T x T tensor), so both sides carry the same baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from sparse_viz.model.attention import dense_causal_attention, gathered_sparse_attention, masked_sparse_attention
from sparse_viz.model.selectors import select_keys

from timing import interleaved_medians, print_cpu  # bench/timing.py (the script's own folder is on sys.path)


def memory_worker(name: str, T: int, args) -> dict:
    """One candidate in a fresh process: inputs, selection, warm-up, timed calls, peak RSS."""
    from sparse_viz.model.indexer_blocks import blockwise_topk

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, T, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g, requires_grad=args.backward) for _ in range(3))
    grad = torch.randn(shape, generator=g)
    q_i, k_i, w_i = torch.randn(args.batch, T, 4, 32, generator=g), torch.randn(args.batch, T, 32, generator=g), \
        torch.randn(args.batch, T, 4, generator=g)
    selected = blockwise_topk(q_i, k_i, w_i, args.top_k)  # (B, T, k)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def call():
        if name in ("csr", "fused"):
            out = gathered_sparse_attention(q, k, v, selected, kernel=name)[0]
        else:
            out = dense_causal_attention(q, k, v)
        if args.backward:
            torch.autograd.grad(out, (q, k, v), grad)

    call()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"times": times, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mb": baseline}


def memory_main(args) -> None:
    """Each (T, candidate) in a fresh process, candidates alternating; ratios csr and fused / SDPA."""
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s) per worker, "
          f"B={args.batch} H={args.heads} hd={args.head_dim} k={args.top_k}, "
          f"{'forward+backward' if args.backward else 'forward'}, one fresh process per candidate, "
          f"median of {args.reps} calls after one warm-up")
    for T in args.seq_lens:
        found = {}
        for name in ("sdpa", "csr", "fused"):
            command = [sys.executable, __file__, "--memory-worker", name, "--seq-lens", str(T), "--reps", str(args.reps),
                       "--top-k", str(args.top_k), "--batch", str(args.batch), "--heads", str(args.heads),
                       "--head-dim", str(args.head_dim), "--threads", str(args.threads)]
            command += ["--backward"] if args.backward else []
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(done.stderr[-2000:])
            found[name] = json.loads(done.stdout.strip().splitlines()[-1])
        base = found["sdpa"]
        print(f"T={T} (RSS before the calls: {base['baseline_rss_mb']:.0f} MB)")
        for name, label in (("sdpa", "dense SDPA (fused)"), ("csr", "gathered sparse (csr)"),
                            ("fused", "gathered sparse (fused)")):
            r = found[name]
            print(f"  {label:22s} median {statistics.median(r['times']) * 1e3:8.1f} ms  best {min(r['times']) * 1e3:8.1f} ms  "
                  f"peak RSS {r['rss_mb']:6.0f} MB   this/SDPA: time {statistics.median(r['times']) / statistics.median(base['times']):5.2f}x "
                  f"(best {min(r['times']) / min(base['times']):5.2f}x)  memory {r['rss_mb'] / base['rss_mb']:5.2f}x  "
                  f"memory above the inputs {(r['rss_mb'] - r['baseline_rss_mb']) / max(base['rss_mb'] - base['baseline_rss_mb'], 1e-9):5.2f}x")


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--copy", action="store_true",
                        help="also time the plain gathered-copy kernel (the non-CPU fallback; slow here)")
    parser.add_argument("--memory", action="store_true",
                        help="csr vs dense SDPA, time and peak RSS, each in a fresh process (see above)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.seq_lens[0], args)))
        return
    if args.memory:
        memory_main(args)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch} H={args.heads} "
          f"hd={args.head_dim} k={args.top_k}, {'forward+backward' if args.backward else 'forward'}, "
          f"median of {args.reps} interleaved reps")
    for T in args.seq_lens:
        shape = (args.batch, args.heads, T, args.head_dim)
        q, k, v = (torch.randn(shape, requires_grad=args.backward) for _ in range(3))
        selected = select_keys("topk", top_k=args.top_k, seq_len=T,
                               index_scores=torch.randn(args.batch, T, T))  # (B, T, k)
        grad = torch.randn(shape)

        def timed(attend):
            def run():
                out = attend()
                if args.backward:
                    torch.autograd.grad(out, (q, k, v), grad)
            return run

        candidates = {
            "masked sparse (reference)": timed(lambda: masked_sparse_attention(q, k, v, selected)[0]),
            "gathered sparse (csr)": timed(lambda: gathered_sparse_attention(q, k, v, selected, kernel="csr")[0]),
            "gathered sparse (fused)": timed(lambda: gathered_sparse_attention(q, k, v, selected, kernel="fused")[0]),
            "dense SDPA (context)": timed(lambda: dense_causal_attention(q, k, v)),
        }
        if args.copy:
            candidates["gathered sparse (copy)"] = timed(
                lambda: gathered_sparse_attention(q, k, v, selected, kernel="copy")[0])
        medians = interleaved_medians(candidates, args.reps)
        base, base_best = medians["masked sparse (reference)"]
        print(f"T={T}")
        for name, (seconds, best) in medians.items():
            print(f"  {name:28s} median {seconds * 1e3:8.1f} ms  masked/this = {base / seconds:5.2f}x   "
                  f"best {best * 1e3:8.1f} ms  masked/this = {base_best / best:5.2f}x")


if __name__ == "__main__":
    main()
