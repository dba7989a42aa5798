"""Grouped-query sparse attention: the fused kernel reading each key/value head once for its group
of query heads, vs the same attention on key/value heads repeated per query head (what the retrofit
did before, and what any kernel without grouped heads must do).

    python bench/bench_grouped_attention.py [--seq-len 4096] [--top-k 256] [--reps 5] [--threads 1]

Per (query heads, key/value heads) shape, head size 64, batch 1, one selection of a random Lightning
Indexer projection (`blockwise_topk`): forward + backward of `fused_selected_attention`, interleaved
medians (and best) of `--reps` rounds in this process, and their ratio. The repeated side includes
its `repeat_interleave` copies and the backward's sum over them, as a model using it would pay.
Shapes: MQA (4/1), GQA of the small model (4/2), SmolLM2-135M's 9/3, and Qwen3 / Llama groups
(16/8, 32/8).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SHAPES = ((4, 1), (4, 2), (9, 3), (16, 8), (32, 8))  # (query heads, key/value heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from sparse_viz.model.fused_kernels import fused_selected_attention, load_fused_kernels
    from sparse_viz.model.indexer_blocks import blockwise_topk

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import interleaved_medians, print_cpu

    print_cpu()
    if load_fused_kernels() is None:
        sys.exit("the fused kernels are not built on this machine")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, head_dim = args.seq_len, 64
    selected = blockwise_topk(torch.randn(1, T, 4, 32), torch.randn(1, T, 32), torch.randn(1, T, 4), args.top_k)
    print(f"T={T}, k={args.top_k}, head size {head_dim}, batch 1, {args.threads} thread(s), forward + backward, "
          f"median (best) of {args.reps} interleaved reps:")
    for heads, kv_heads in SHAPES:
        group = heads // kv_heads
        q = torch.randn(1, heads, T, head_dim, requires_grad=True)
        k, v = (torch.randn(1, kv_heads, T, head_dim, requires_grad=True) for _ in range(2))

        def grouped():
            out, _ = fused_selected_attention(q, k, v, selected)
            out.sum().backward()

        def repeated():
            out, _ = fused_selected_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), selected)
            out.sum().backward()

        medians = interleaved_medians({"grouped": grouped, "repeated": repeated}, args.reps)
        (g_med, g_best), (r_med, r_best) = medians["grouped"], medians["repeated"]
        print(f"  {heads:2d} query / {kv_heads} key-value heads: grouped {g_med:6.3f} s ({g_best:.3f})   "
              f"repeated {r_med:6.3f} s ({r_best:.3f})   grouped/repeated {g_med / r_med:5.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `sparse_viz`
    main()
