"""One training step (forward + backward), DSA sparse stage vs a dense model of the same size.

    python bench/bench_train_step.py [--reps 5] [--threads 0]

Same architecture and batch for every row (d_model 256, 4 layers, 4 heads, SwiGLU 768, vocab
2048, indexer 4 heads x 32, top_k 64, batch 4, T 512). Rows:
- dense model: no indexer, fused SDPA causal attention, LM loss (the baseline);
- DSA sparse stage: indexer top-k selection (blockwise indexer path), gathered attention, LM
  loss + indexer KL over the selected set (DeepSeek stage 2), on the fused CPU kernels;
- the same step with the fused kernels off (torch-op top-k, CSR kernels: the step before them);
- for context: the same with the masked reference attention path, with the full-matrix indexer
  path, and the warm-up stage (dense attention, KL over all causal keys).
Medians of interleaved repetitions; ratios against the dense model measured in the same run.
Goal: DSA sparse stage <= 1.3x the dense step.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.fused_kernels import fused_kernels_disabled

from timing import interleaved_medians, print_cpu  # bench/timing.py (the script's own folder is on sys.path)

MODEL = dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, d_ff=768, max_seq_len=512,
             indexer_heads=4, indexer_dim=32, indexer_rope_dim=16, top_k=64)


def training_step(model: SparseTransformer, ids: torch.Tensor, attention: str, indexer_loss: str | None,
                  fused: bool = True):
    """Forward + backward of one step; returns a closure for the timer. fused=False: with the fused
    CPU kernels off."""

    def step():
        with contextlib.nullcontext() if fused else fused_kernels_disabled():
            run()

    def run():
        out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        if out.indexer_kl is not None:
            loss = loss + out.indexer_kl.sum()
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-context", action="store_true", help="only the dense and DSA rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq_len + 1))

    dense = SparseTransformer(ModelConfig(**MODEL, selector="dense", use_indexer=False)).train()
    dsa = SparseTransformer(ModelConfig(**MODEL, selector="topk", attention_path="gathered")).train()
    dsa_masked = SparseTransformer(ModelConfig(**MODEL, selector="topk", attention_path="masked")).train()
    dsa_masked.load_state_dict(dsa.state_dict())
    dsa_full = SparseTransformer(ModelConfig(**MODEL, selector="topk", indexer_path="full")).train()
    dsa_full.load_state_dict(dsa.state_dict())
    candidates = {
        "dense model (baseline)": training_step(dense, ids, "dense", None),
        "DSA sparse stage (gathered)": training_step(dsa, ids, "sparse", "selected"),
        "  the same, fused kernels off": training_step(dsa, ids, "sparse", "selected", fused=False),
    }
    if not args.no_context:
        candidates["DSA sparse stage (masked)"] = training_step(dsa_masked, ids, "sparse", "selected")
        candidates["DSA sparse (full indexer)"] = training_step(dsa_full, ids, "sparse", "selected")
        candidates["DSA warm-up stage"] = training_step(dsa, ids, "dense", "all")
        candidates["DSA model, LM loss only"] = training_step(dsa, ids, "sparse", None)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x T {args.seq_len}, "
          f"{dense.num_parameters() / 1e6:.2f}M params dense / {dsa.num_parameters() / 1e6:.2f}M with indexers, "
          f"median of {args.reps} interleaved reps")
    medians = interleaved_medians(candidates, args.reps)
    base, base_best = medians["dense model (baseline)"]
    for name, (seconds, best) in medians.items():
        print(f"  {name:30s} median {seconds * 1e3:8.1f} ms  this/dense = {seconds / base:5.2f}x   "
              f"best {best * 1e3:8.1f} ms  this/dense = {best / base_best:5.2f}x")


if __name__ == "__main__":
    main()
