"""Retrofit warm-up cost: one warm-up training step vs a plain no-grad forward of the frozen model.

    python bench/bench_retrofit_warmup.py [--model .cache/smollm2-135m] [--seq-len 1024] [--reps 5]
        [--threads 2] [--indexer-heads 4 --indexer-dim 64 --indexer-rope-dim 32]

Both candidates run on the same batch (1 x T tokens of random ids), interleaved in one process
(`timing.interleaved_medians`, one warm-up round):
- `forward`: `model(input_ids)` under `torch.no_grad()` with transformers' SDPA attention (the
  fastest the frozen model runs on this CPU);
- `warmup_<path>`: `RetrofitModel(..., attention="dense", indexer_loss="all")`: the same forward
  plus each layer's warm-up KL of its indexer against the attention summed over heads, the
  backward into the 30 indexers, and one AdamW step; one candidate per `--paths` value
  (`RetrofitModel`'s `warmup_kl`: blocks (the default), full, checkpointed).
Goal: warm-up step <= 2x the forward at T = 1024 on SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import interleaved_medians, print_cpu  # noqa: E402

from sparse_viz.pretrained.loading import load_model  # noqa: E402
from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers  # noqa: E402
from sparse_viz.pretrained.retrofit_model import RetrofitModel  # noqa: E402


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--indexer-heads", type=int, default=4)
    parser.add_argument("--indexer-dim", type=int, default=64)
    parser.add_argument("--indexer-rope-dim", type=int, default=32)
    parser.add_argument("--paths", nargs="+", default=["blocks", "full"], help="warmup_kl paths to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    plain = load_model(args.model, device="cpu", attn_implementation="sdpa").model
    ids = torch.randint(0, plain.config.vocab_size, (1, args.seq_len))

    def forward():
        with torch.no_grad():
            plain(input_ids=ids, use_cache=False)

    def warmup_step_of(path: str):
        loaded = load_model(args.model, device="cpu", attn_implementation="sdpa")
        indexers = RetrofitIndexers.for_model(loaded.adapter, args.indexer_heads, args.indexer_dim,
                                              args.indexer_rope_dim)
        retrofit = RetrofitModel(loaded.model, indexers, top_k=64, warmup_kl=path)
        for parameter in retrofit.main_parameters():
            parameter.requires_grad_(False)
        optimizer = torch.optim.AdamW(indexers.parameters(), lr=1e-3)

        def step():
            out = retrofit(ids, attention="dense", indexer_loss="all")
            optimizer.zero_grad(set_to_none=True)
            out.indexer_kl.sum().backward()
            optimizer.step()
        return step, indexers

    candidates = {"forward": forward}
    for path in args.paths:
        candidates[f"warmup_{path}"], indexers = warmup_step_of(path)
    medians = interleaved_medians(candidates, args.reps)
    base, base_best = medians["forward"]
    print(f"{args.model}: T={args.seq_len}, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{len(indexers)} indexers of {args.indexer_heads} x {args.indexer_dim} "
          f"({indexers.parameter_count():,} parameters); median (best) of {args.reps} interleaved reps")
    for name, (median, best) in medians.items():
        print(f"  {name:20s} {median:7.3f} s ({best:.3f})   /forward: {median / base:5.2f}x (best {best / base_best:5.2f}x)")


if __name__ == "__main__":
    main()
