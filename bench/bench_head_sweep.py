"""Head-ablation sweep on SmolLM2-135M (30 layers x 9 heads = 270 heads), 64-token prompt.

Three ways to get the same table, timed side by side in one run (repetitions interleaved,
medians reported):
    one_per_head   one full forward per ablated head (the naive loop)
    batched        `batch_size` ablations per forward, each batch row ablating a different head
    batched+prefix batched, and each forward starts at the first layer its ablations touch,
                   from the baseline's recorded input of that layer (the default path)
All three tables are checked to agree, then the heads with the largest KL are printed.

    python bench/bench_head_sweep.py --threads 1            # all 270 heads
    python bench/bench_head_sweep.py --layers 0,10,20 --repeats 3
    python bench/bench_head_sweep.py --positions 63          # heads ablated at the last token only

On a CPU the sweep is compute-bound: batching only amortises per-call overhead and prefix reuse
removes ~38% of the FLOPs (17.4 -> 10.7 GFLOP per head on average), so expect ~2x there. The
script prints each method's FLOPs and GFLOP/s and the fp32 GEMM peak, hence the most an exact
sweep could gain on this machine. The large batching gains are on a GPU, where a 64-token
forward is launch-bound. On a shared CPU use --threads 1: with several threads, OpenMP
thrashing inflates every small op and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sparse_viz.analysis.ablation.heads import (
    AttentionLayout,
    head_ablation_study,
    single_head_ablations,
)
from sparse_viz.pretrained.loading import load_model

from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)

PROMPT = (
    "The history of the city begins with a small fishing village on the northern bank of the river. "
    "Over the centuries it grew into a busy port, and merchants from distant countries came to trade "
    "wool, salt and spices. When the railway arrived, the old harbour lost its importance, but the "
    "university founded in the same decade attracted students and scholars from across the continent, "
    "and the city slowly became known for its libraries, its music and its long tradition of printing."
)


def random_smollm2(device: str, dtype: str):
    """SmolLM2-135M's architecture (LlamaForCausalLM) with random weights: (model, None, name, device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model = LlamaForCausalLM(config).to(device=target, dtype=getattr(torch, dtype)).eval()
    return model, None, "SmolLM2-135M architecture, random weights", target


def forward_flops(model, T: int, first_layer: int = 0) -> float:
    """Matmul FLOPs of one T-token forward from `first_layer` on: projections, MLP, scores, LM head."""
    c = model.config
    d, hd = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size)  # q, k, v, o, gate/up/down
    scores = 2 * 2 * c.num_attention_heads * hd * T * (T + 1) / 2  # QK^T and AV over the causal half
    layers = c.num_hidden_layers - first_layer
    return layers * (T * per_token + scores) + 2 * T * d * c.vocab_size


def matmul_peak_gflops(m: int = 1728, k: int = 576, n: int = 1536, reps: int = 10) -> float:
    """fp32 GEMM throughput of this machine at a sweep-like shape (the compute ceiling)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def print_roofline(model, T: int, ablations, times: dict[str, list[float]], batch_size: int) -> None:
    """Achieved GFLOP/s of each method, and the best ratio an exact sweep could reach here."""
    full = forward_flops(model, T)
    def suffix(a):  # the prefix path runs positions from the ablation's first one on
        first = 0 if a.positions is None else min(p % T for p in a.positions)
        return forward_flops(model, T, min(a.layers)) * (T - first) / T  # ~linear in positions at this T

    flops = {"one_per_head": full * len(ablations), "batched": full * len(ablations),
             "batched+prefix": sum(suffix(a) for a in ablations)}
    print("\nwork per method (matmul FLOPs from the config) and achieved throughput:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:>15}: {flops[name] / 1e9:8.1f} GFLOP  {flops[name] / median / 1e9:6.1f} GFLOP/s")
    if "one_per_head" in times and next(iter(model.parameters())).device.type == "cpu":
        peak = matmul_peak_gflops(m=batch_size * T)
        bound = statistics.median(times["one_per_head"]) / (flops["batched+prefix"] / (peak * 1e9))
        print(f"  fp32 GEMM peak at the sweep's shape: {peak:.0f} GFLOP/s -> an exact sweep can be at most "
              f"{bound:.1f}x faster than one_per_head on this CPU (all its FLOPs at peak)")


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(".cache/smollm2-135m")))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", default=None, help='subset of layers to sweep, e.g. "0,10,20" (default: all)')
    parser.add_argument("--positions", default=None,
                        help='ablate heads only at these positions, e.g. "63" (default: all); the sweep then runs '
                             'only the positions from the first one on')
    parser.add_argument("--batch-size", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-naive", action="store_true", help="time only the two batched paths")
    parser.add_argument("--random-init", action="store_true",
                        help="SmolLM2-135M's architecture with random weights and random token ids: same FLOPs and "
                             "timings, no checkpoint needed (for machines the checkpoint cannot reach, e.g. a GPU box)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--methods", default=None,
                        help='comma-separated subset of one_per_head,batched,batched+prefix (default: all)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.random_init:
        model, tokenizer, name, device = random_smollm2(args.device, args.dtype)
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    else:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        model, tokenizer, name, device = loaded.model, loaded.tokenizer, loaded.name_or_path, loaded.device
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, : args.tokens].to(device)  # (1, T)
    assert ids.shape[1] == args.tokens, f"prompt has only {ids.shape[1]} tokens"
    layout = AttentionLayout.of(model)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    positions = None if args.positions is None else [int(x) for x in args.positions.split(",")]
    ablations = single_head_ablations(layout, layers=layers, positions=positions)
    print(f"{name}: {layout.n_layers} layers x {layout.n_heads} heads; sweeping {len(ablations)} heads "
          f"on {ids.shape[1]} tokens; device {device} ({args.dtype}), torch threads {torch.get_num_threads()}")

    methods = {
        "one_per_head": dict(batch_size=1, reuse_prefix=False),
        "batched": dict(batch_size=args.batch_size, reuse_prefix=False),
        "batched+prefix": dict(batch_size=args.batch_size, reuse_prefix=True),
    }
    if args.skip_naive:
        del methods["one_per_head"]
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    times: dict[str, list[float]] = {name: [] for name in methods}
    tables = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    head_ablation_study(model, ids, ablations[:2], batch_size=2, patterns=False, progress=False)  # warm-up
    for _ in range(args.repeats):
        for name, options in methods.items():  # interleaved: every repetition runs every method
            sync()
            start = time.perf_counter()
            result = head_ablation_study(model, ids, ablations, patterns=False, progress=False, **options)
            sync()
            times[name].append(time.perf_counter() - start)
            tables[name] = result.table

    reference = tables["batched+prefix"]
    for name, table in tables.items():
        diff = (table["kl_divergence"] - reference["kl_divergence"]).abs().max()
        same_top1 = (table["frac_top1_changed"] == reference["frac_top1_changed"]).mean()
        print(f"  check {name:>15}: max |KL diff| vs batched+prefix = {diff:.2e}, equal top-1 fractions {same_top1:.0%}")
    base = statistics.median(times["one_per_head"]) if "one_per_head" in times else None
    print(f"\nmedian seconds over {args.repeats} repetition(s), {len(ablations)} heads:")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"   speed-up vs one_per_head: {base / median:5.2f}x" if base else ""
        print(f"  {name:>15}: {median:8.2f} s  ({median / len(ablations) * 1000:7.1f} ms/head){ratio}")
    if "batched" in times:
        print(f"  prefix reuse alone: {statistics.median(times['batched']) / statistics.median(times['batched+prefix']):.2f}x")

    print_roofline(model, ids.shape[1], ablations, times, args.batch_size)

    print("\nheads with the largest KL(baseline || ablated), mean over all positions:")
    top = reference.sort_values("kl_divergence", ascending=False).head(10)
    print(top[["ablation", "kl_divergence", "frac_top1_changed", "delta_logprob_top1"]].to_string(index=False))
    if tokenizer is not None:
        print(f"\nprompt ({ids.shape[1]} tokens): {tokenizer.decode(ids[0])!r}")


if __name__ == "__main__":
    main()
