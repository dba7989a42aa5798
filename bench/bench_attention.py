"""Attention only: gathered sparse attention vs dense masked sparse attention (same selection).

    python bench/bench_attention.py [--reps 5] [--seq-lens 1024 4096] [--top-k 256] [--backward] [--copy]

Prints, per sequence length, medians of interleaved repetitions and their ratios against the
masked path measured in the same run (`--backward`: forward + backward; `--copy`: also the
plain gathered-copy kernel used off CPU). Goal (issue 2): gathered >= 2x faster than masked at
T=4096, k=256 on CPU. Fused dense SDPA (no selection at all) is printed for context.
"""

from __future__ import annotations

import argparse

import torch

from sparse_viz.model.attention import dense_causal_attention, gathered_sparse_attention, masked_sparse_attention
from sparse_viz.model.selectors import select_keys

from timing import interleaved_medians  # bench/timing.py (the script's own folder is on sys.path)


def main() -> None:
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
