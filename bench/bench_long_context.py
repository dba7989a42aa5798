"""Long context: one training step of the DSA sparse stage vs the dense model, time and peak memory.

    python bench/bench_long_context.py [--seq-lens 1024 2048 4096 8192] [--rounds 2] [--steps 2]
        [--threads 1] [--indexer-at 8192] [--with-csr] [--with-full-indexer] [--with-ranked-topk] [--with-warmup]
        [--kv-heads 4]
    python bench/bench_long_context.py --breakdown --seq-lens 8192   (one layer's pieces, one process)
    python bench/bench_long_context.py --profile dsa --seq-lens 8192  (one step's operators, torch profiler)

Model (the long-context step the goal was set on): d_model 256, 2 layers, 4 heads, SwiGLU 768, vocab 2048, indexer 4 heads x 32,
batch 1, top_k 256; one forward + backward per step. `--kv-heads 1` gives both models one key/value
head shared by the 4 query heads (MQA, as DeepSeek runs DSA on MLA; grouped-query attention for
2); the default, 4, is the multi-head model the goal was set on. Candidates:
- `dense`: no indexer, fused SDPA causal attention, LM loss (the baseline);
- `dsa`: DSA sparse stage on the default paths: the fused CPU kernels (`fused_kernels.py`: the
  indexer's top-k row by row, sparse attention saving a log-sum-exp, the indexer's KL over the
  selected keys computed with its scores there, neither stored), LM loss + that KL
  (indexer_path=blockwise);
- `dsa_csr` (`--with-csr`): the same step with the fused kernels off (SPARSE_VIZ_FUSED_KERNELS=0):
  top-k by query blocks in torch ops, CSR sparse attention and selected-key scores, then
  `indexer_kl` on them in torch ops (before);
- `dsa_full` (`--with-full-indexer`): the same with the full-matrix indexer (the reference);
- `dsa_ranked` (`--with-ranked-topk`): `dsa_csr` with the blockwise top-k ranking every key of a
  row (`topk_earliest_ties`), as before the prefilter of `topk_prefilter.py`: same selections;
- `warmup` / `warmup_full` (`--with-warmup`): the warm-up stage's step (main model frozen, dense
  attention, the indexer's KL over all causal keys) on the blockwise path (SDPA for the
  attention, the KL by checkpointed query blocks) and on the full-matrix path (dense (B, H, T, T)
  probabilities as the target, (B, T, T) scores);
- `indexer_blockwise` / `indexer_full` (at `--indexer-at` only): the indexer alone, top-k
  selection + KL at the selected keys (a fixed random target) + backward, block path
  (`selected_index_kl`, as the model) vs full path (`indexer_kl` of the full matrix read there).

Every measurement is a fresh process (`--worker`): peak resident memory (`ru_maxrss`) is then
that candidate's own, and no allocator state carries over. Each process builds the model, runs one
warm-up step and `--steps` timed steps (their median); the parent runs `--rounds` rounds, each
visiting every candidate in a rotated order, and prints per candidate the median and best step
time over all rounds, the peak RSS (largest of its processes) and the ratios against `dense` at
the same T. It ends with the crossover: the smallest measured T where DSA's median is below dense's.
Goals: DSA <= 0.5x dense's time at T = 8192 and <= 1.1x its peak memory.
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

MODEL = dict(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, d_ff=768, indexer_heads=4, indexer_dim=32,
             indexer_rope_dim=16, top_k=256)
STEP_CANDIDATES = ("dense", "dsa", "dsa_csr", "dsa_full", "dsa_ranked", "warmup", "warmup_full")
INDEXER_CANDIDATES = ("indexer_blockwise", "indexer_full")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(name: str, seq_len: int, steps: int, threads: int, device: str = "cpu", dtype: str = "float32",
           profile: bool = False) -> dict | None:
    """One candidate in this process: build, one warm-up step, `steps` timed ones. On CUDA the peak
    is the allocator's (`max_memory_allocated`), each step is timed between synchronisations, and
    `dtype` bfloat16 runs the step under autocast. `profile`: instead, one step under the torch
    profiler, its operators printed by self time (where a step's time goes)."""
    import os

    if name in ("dsa_csr", "dsa_ranked"):  # the step before the fused kernels, in this process only
        os.environ["SPARSE_VIZ_FUSED_KERNELS"] = "0"
    import torch
    import torch.nn.functional as F

    from sparse_viz.model import ModelConfig, SparseTransformer
    from sparse_viz.model.attention import gather_selected
    from sparse_viz.model.indexer import indexer_kl
    from sparse_viz.model.indexer_blocks import blockwise_topk, selected_index_kl
    from sparse_viz.model.selectors import topk_causal

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline_rss = peak_rss_mb()
    T = seq_len
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user runs; both candidates alike
    ids = torch.randint(0, MODEL["vocab_size"], (1, T + 1), device=device)
    config = dict(MODEL, max_seq_len=T)

    if name in STEP_CANDIDATES:
        if name == "dense":
            model = SparseTransformer(ModelConfig(**config, selector="dense", use_indexer=False))
            attention, indexer_loss = "dense", None
        elif name.startswith("dsa"):
            path = "full" if name == "dsa_full" else "blockwise"
            if name == "dsa_ranked":  # the model's blockwise top-k without the prefilter, this process only
                import sparse_viz.model.indexer_blocks as blocks
                from sparse_viz.model.selectors import topk_earliest_ties
                blocks.topk_earliest_ties_prefiltered = lambda scores, k: topk_earliest_ties(scores, k)
            model = SparseTransformer(ModelConfig(**config, indexer_path=path))
            attention, indexer_loss = "sparse", "selected"
        else:
            path = "blockwise" if name == "warmup" else "full"
            model = SparseTransformer(ModelConfig(**config, indexer_path=path))
            attention, indexer_loss = "dense", "all"
            for parameter in model.main_parameters():  # the warm-up stage trains the indexer only
                parameter.requires_grad_(False)
        model.to(device).train()

        def step():
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                out = model(ids[:, :-1], attention=attention, indexer_loss=indexer_loss)
            loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
            if name.startswith("warmup"):
                loss = out.indexer_kl.sum()
            elif out.indexer_kl is not None:
                loss = loss + out.indexer_kl.sum()
            model.zero_grad(set_to_none=True)
            loss.backward()
    else:
        full_model = SparseTransformer(ModelConfig(**config)).to(device)
        indexer, rope = full_model.blocks[0].indexer, full_model.indexer_rope(T)
        x = torch.randn(1, T, MODEL["d_model"], device=device)
        target = torch.rand(1, T, MODEL["top_k"], device=device)  # stands for the main attention at the selected keys

        def step():
            if name == "indexer_blockwise":
                q, k, w = indexer.project(x, *rope)
                selected = blockwise_topk(q, k, w, MODEL["top_k"])
                kl = selected_index_kl(q, k, w, selected, target).mean()
            else:
                full, _ = indexer(x, *rope)  # (1, T, T)
                selected = topk_causal(full, MODEL["top_k"])
                kl = indexer_kl(target, gather_selected(full, selected), selected >= 0).mean()
            indexer.zero_grad(set_to_none=True)
            kl.backward()

    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    step()  # warm-up
    sync()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"{name} at T={T}, one step, {torch.get_num_threads()} thread(s), operators by self time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        return None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_cuda else peak_rss_mb()
    return {"times": times, "rss_mb": peak_mb, "baseline_rss_mb": baseline_rss,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if on_cuda else "cpu"}


def breakdown(seq_len: int, reps: int, threads: int) -> None:
    """Per-layer pieces of both steps at one T, in this process (interleaved medians): where the
    time goes, and the floor it puts under DSA's step on this CPU."""
    import torch

    from sparse_viz.model import ModelConfig, SparseTransformer
    from sparse_viz.model.attention import (
        dense_causal_attention,
        gathered_sparse_attention,
    )
    from sparse_viz.model.csr_attention import SelectionPattern
    from sparse_viz.model.indexer import indexer_kl
    from sparse_viz.model.indexer_blocks import blockwise_topk, selected_index_kl, selected_index_scores
    from sparse_viz.model.selectors import select_keys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import interleaved_medians

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    T, H, hd = seq_len, MODEL["n_heads"], MODEL["d_model"] // MODEL["n_heads"]
    model = SparseTransformer(ModelConfig(**MODEL, max_seq_len=T))
    x = torch.randn(1, T, MODEL["d_model"])
    q_i, k_i, w_i = (t.detach().requires_grad_() for t in model.blocks[0].indexer.project(x, *model.indexer_rope(T)))
    q = torch.randn(1, H, T, hd, requires_grad=True)
    k, v = (torch.randn(1, MODEL["n_kv_heads"], T, hd, requires_grad=True) for _ in range(2))
    selected = blockwise_topk(q_i, k_i, w_i, MODEL["top_k"])

    # The last k keys of each query: the gathers of a local window are contiguous, the indexer's
    # selections (random here, from a random-initialised indexer) are scattered over the keys.
    local = select_keys("local", top_k=MODEL["top_k"], seq_len=T)

    def attention_sparse(kernel, selection=selected):
        pattern = SelectionPattern(selection) if kernel == "csr" else None
        y, _ = gathered_sparse_attention(q, k, v, selection, return_probs=True, check_order=False, pattern=pattern,
                                         kernel=kernel, sum_heads=True)
        y.sum().backward()

    target = torch.rand(1, T, MODEL["top_k"])  # stands for the main attention at the selected keys

    def indexer_loss(kernel):
        if kernel == "fused":  # the KL computed with the scores, per row
            kl = selected_index_kl(q_i, k_i, w_i, selected, target, kernel="fused")
        else:  # the scores (B, T, k), then the KL in torch ops
            kl = indexer_kl(target, selected_index_scores(q_i, k_i, w_i, selected, kernel=kernel), selected >= 0)
        kl.mean().backward()

    def attention_dense():
        dense_causal_attention(q, k, v).sum().backward()

    medians = interleaved_medians({
        "indexer top-k, fused (no grad)": lambda: blockwise_topk(q_i, k_i, w_i, MODEL["top_k"], kernel="fused"),
        "  by blocks in torch ops (before)": lambda: blockwise_topk(q_i, k_i, w_i, MODEL["top_k"], kernel="torch"),
        "sparse attention, fused, fwd+bwd": lambda: attention_sparse("fused"),
        "  the same, CSR (before)": lambda: attention_sparse("csr"),
        "  fused, on a local window's selection": lambda: attention_sparse("fused", local),
        "indexer KL at S_t, fused, fwd+bwd": lambda: indexer_loss("fused"),
        "  CSR scores + indexer_kl (before)": lambda: indexer_loss("csr"),
        "dense attention, fused SDPA, fwd+bwd": attention_dense,
    }, reps)
    print(f"T={T}, one layer's pieces, {threads} thread(s), median (best) of {reps} interleaved reps:")
    for name, (median, best) in medians.items():
        print(f"  {name:38s} {median:7.3f} s ({best:.3f})")
    topk = medians["indexer top-k, fused (no grad)"][0]
    sdpa = medians["dense attention, fused SDPA, fwd+bwd"][0]
    print(f"  per layer, DSA's top-k alone is {topk / sdpa:.2f}x the dense layer's whole attention "
          f"(forward and backward): it scores and ranks T^2/2 pairs, like dense attention, with no gradient")


def run_worker(name: str, seq_len: int, steps: int, threads: int, device: str = "cpu", dtype: str = "float32") -> dict:
    command = [sys.executable, __file__, "--worker", name, "--seq-lens", str(seq_len), "--steps", str(steps),
               "--threads", str(threads), "--device", device, "--dtype", dtype,
               "--kv-heads", str(MODEL["n_kv_heads"])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} T={seq_len} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    parser.add_argument("--indexer-at", type=int, nargs="*", default=[8192],
                        help="sequence lengths where the indexer alone is measured, block vs full path")
    parser.add_argument("--with-csr", action="store_true",
                        help="also the sparse-stage step with the fused kernels off (CSR kernels, torch top-k)")
    parser.add_argument("--with-full-indexer", action="store_true",
                        help="also the sparse-stage step with the full-matrix indexer (slow, ~6 GB at T=8192)")
    parser.add_argument("--with-ranked-topk", action="store_true",
                        help="also the sparse-stage step whose top-k ranks every key (before the prefilter)")
    parser.add_argument("--with-warmup", action="store_true",
                        help="also the warm-up stage's step, blockwise and full-matrix paths")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-layer pieces of both steps at the first --seq-lens value, in one process")
    parser.add_argument("--profile", choices=STEP_CANDIDATES,
                        help="one step of this candidate at the first --seq-lens value under the torch profiler")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: allocator peak instead of RSS)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: each step under autocast")
    parser.add_argument("--kv-heads", type=int, default=MODEL["n_heads"],
                        help="key/value heads of both models (dividing the 4 query heads; 1 = MQA)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kv_heads <= 0 or MODEL["n_heads"] % args.kv_heads:
        parser.error(f"--kv-heads must divide the {MODEL['n_heads']} query heads, got {args.kv_heads}")
    MODEL["n_kv_heads"] = args.kv_heads
    if args.breakdown:
        breakdown(args.seq_lens[0], max(args.rounds, 3), args.threads)
        return
    if args.profile:
        worker(args.profile, args.seq_lens[0], 0, args.threads, args.device, args.dtype, profile=True)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_lens[0], args.steps, args.threads, args.device, args.dtype)))
        return
    from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)

    print_cpu()  # the workers run on the same CPU

    jobs = []  # (T, candidate)
    for T in args.seq_lens:
        wanted = {"dense", "dsa"} | ({"dsa_csr"} if args.with_csr else set()) | \
            ({"dsa_full"} if args.with_full_indexer else set()) | \
            ({"dsa_ranked"} if args.with_ranked_topk else set()) | \
            ({"warmup", "warmup_full"} if args.with_warmup else set())
        jobs += [(T, c) for c in STEP_CANDIDATES if c in wanted]
        if T in args.indexer_at:
            jobs += [(T, c) for c in INDEXER_CANDIDATES]
    results: dict[tuple[int, str], list[dict]] = {job: [] for job in jobs}
    started = time.time()
    for round_ in range(args.rounds):
        for T in args.seq_lens:  # interleaved within each T, the order rotated every round
            group = [job for job in jobs if job[0] == T]
            shift = round_ % len(group)
            for job in group[shift:] + group[:shift]:
                run = run_worker(job[1], T, args.steps, args.threads, args.device, args.dtype)
                results[job].append(run)
                print(f"  [round {round_ + 1}] T={T} {job[1]}: median {statistics.median(run['times']):.4f} s, "
                      f"peak {run['rss_mb']:.0f} MB", flush=True)
    first = next(iter(results.values()))[0]
    memory = "allocator peak" if args.device.startswith("cuda") else "peak RSS"
    print(f"torch {first['torch']} on {first['device']} ({args.dtype}), {first['threads']} thread(s) per worker, "
          f"batch 1, k={MODEL['top_k']}, {MODEL['n_kv_heads']} key/value heads, {args.rounds} rounds x {args.steps} "
          f"timed steps, one fresh process per measurement, memory = {memory}; RSS after importing torch: {first['baseline_rss_mb']:.0f} MB; "
          f"wall {time.time() - started:.0f} s")

    summary: dict[tuple[int, str], tuple[float, float, float]] = {}
    for job, runs in results.items():
        times = [t for run in runs for t in run["times"]]
        summary[job] = (statistics.median(times), min(times), max(run["rss_mb"] for run in runs))
    crossover = None
    for T in args.seq_lens:
        print(f"T={T}")
        for base_name, names in (("dense", STEP_CANDIDATES), ("indexer_full", INDEXER_CANDIDATES)):
            if (T, base_name) not in summary:
                continue
            base_median, base_best, base_rss = summary[(T, base_name)]
            for name in names:
                if (T, name) not in summary:
                    continue
                median, best, rss = summary[(T, name)]
                print(f"  {name:18s} median {median:8.4f} s  best {best:8.4f} s  peak {rss:7.0f} MB   "
                      f"/{base_name}: time {median / base_median:5.2f}x (best {best / base_best:5.2f}x)  "
                      f"memory {rss / base_rss:5.2f}x")
        if crossover is None and (T, "dsa") in summary and summary[(T, "dsa")][0] < summary[(T, "dense")][0]:
            crossover = T
    measured = ", ".join(str(T) for T in args.seq_lens)
    print(f"crossover: DSA's median step below dense's from T={crossover}" if crossover else
          f"crossover: DSA's median step is not below dense's at any measured T ({measured})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `sparse_viz`
    main()
