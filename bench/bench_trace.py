"""What tracing costs: forward with trace=False vs "select" vs "full", and trace=False vs a
forward in which the trace code cannot be reached at all.

    python bench/bench_trace.py [--reps 7] [--threads 0]

"bare forward" below re-runs the same DSA forward (same modules, same weights) as a plain loop
with no trace, loss or selector branches; `trace=False` should cost the same (ratio ~1.00).
The script also asserts that a trace=False forward builds no AttentionTrace and never computes
dense attention probabilities (counted by patching those functions).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model import transformer as transformer_module
from sparse_viz.model.attention import gathered_sparse_attention
from sparse_viz.model.selectors import topk_causal

from timing import interleaved_medians, print_cpu  # bench/timing.py (the script's own folder is on sys.path)

MODEL = dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, d_ff=768, max_seq_len=512,
             indexer_heads=4, indexer_dim=32, indexer_rope_dim=16, top_k=64)


def bare_forward(model: SparseTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The DSA forward with nothing optional in it: embed, blocks (indexer -> top-k -> gathered
    attention -> MLP), head. Only for timing against `model(ids)`."""
    T = ids.shape[1]
    rope, indexer_rope = model.rope(T), model.indexer_rope(T)
    x = model.embed(ids)
    for block in model.blocks:
        h = block.attn_norm(x)
        q, k, v = block.attn.project(h, *rope)
        scores, _ = block.indexer(h, *indexer_rope)
        selected = topk_causal(scores, model.config.top_k)
        y, _ = gathered_sparse_attention(q, k, v, selected)
        x = x + block.attn.merge_heads(y)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.final_norm(x))


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(**MODEL)).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq_len))

    with torch.no_grad():
        torch.testing.assert_close(bare_forward(model, ids), model(ids).logits)
        with mock.patch.object(transformer_module, "AttentionTrace", side_effect=AssertionError("trace built")), \
             mock.patch.object(transformer_module, "causal_attention_probs", side_effect=AssertionError("dense probs")):
            model(ids)  # trace=False reaches neither
        print("check: trace=False builds no AttentionTrace and computes no dense probabilities; "
              "bare forward == model(ids)")

        candidates = {
            "bare forward (no trace code)": lambda: bare_forward(model, ids),
            "trace=False": lambda: model(ids),
            'trace="select"': lambda: model(ids, trace="select"),
            'trace="full"': lambda: model(ids, trace="full"),
        }
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x T {args.seq_len}, "
              f"inference forward, median of {args.reps} interleaved reps")
        medians = interleaved_medians(candidates, args.reps)
    base, base_best = medians["bare forward (no trace code)"]
    for name, (seconds, best) in medians.items():
        print(f"  {name:30s} median {seconds * 1e3:8.1f} ms  this/bare = {seconds / base:5.2f}x   "
              f"best {best * 1e3:8.1f} ms  this/bare = {best / base_best:5.2f}x")


if __name__ == "__main__":
    main()
