"""Timing helper shared by the bench scripts (imported as a sibling: `python bench/bench_x.py`
puts bench/ on sys.path)."""

from __future__ import annotations

import statistics
import time


def interleaved_medians(candidates: dict, reps: int) -> dict[str, tuple[float, float]]:
    """Run every candidate once per round (after one warm-up round); median seconds each.

    The fastest round of each is returned too (`best`): on a shared CPU the median also
    measures the neighbours, the minimum is the closest to the code's own cost.

    Returns:
        {name: (median seconds, best seconds)}.
    """
    times = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(reps + 1):
        # Each round starts with a different candidate, so no one always runs first.
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def print_cpu() -> None:
    """Print the line that says which machine gave the timings that follow: the CPU, torch's
    vector kernels, native bfloat16 or not, and what the fused kernels were built for. CPUs of one
    machine type differ (AVX-512 with native bfloat16 on some, AVX2 only on others)."""
    from sparse_viz.model.cpu_features import describe_cpu

    print(describe_cpu(), flush=True)
