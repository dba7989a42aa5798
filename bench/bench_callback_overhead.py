"""Overhead of SelectionAnalysisCallback at its default frequency (every 50 steps).

    python bench/bench_callback_overhead.py [--steps 100] [--repeats 2] [--threads 1] [--config configs/train/default.yaml]

Trains the same model/data (the default config, or --config) for --steps optimizer steps, with
and without the callback, interleaving the repetitions (A B A B ...), and prints the median
wall time and process CPU time of `trainer.fit` for each and their ratios (on a machine
shared with other jobs the CPU-time ratio is the trustworthy one). The callback's end-of-fit rendering (plots
+ report, done once per run) is timed separately and shown as a share of the full default run
(the sum of the default stages' steps) using the measured time per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparse_viz.data import TextDataModule  # noqa: E402
from sparse_viz.report.training import render_run  # noqa: E402
from sparse_viz.tracking.callback import SelectionAnalysisCallback  # noqa: E402
from sparse_viz.training import DSALightningModule  # noqa: E402

from timing import print_cpu  # bench/timing.py (the script's own folder is on sys.path)


class NoRenderCallback(SelectionAnalysisCallback):
    """The callback without its end-of-fit rendering (timed separately)."""

    def render(self, trainer) -> None:
        pass


def build(config: dict, data: TextDataModule):
    model_cfg = dict(config.get("model", {}))
    model_cfg["stages"] = model_cfg.get("stages") or None  # list of dicts, as the YAML gives them
    model_cfg["vocab_size"] = data.vocab_size
    return DSALightningModule(**model_cfg)


def fit_once(config: dict, data: TextDataModule, steps: int, with_callback: bool, root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one `trainer.fit`."""
    L.seed_everything(0, verbose=False)
    module = build(config, data)
    trainer_cfg = config.get("trainer", {})
    callbacks = [NoRenderCallback(every_n_steps=50)] if with_callback else []
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=str(root), val_check_interval=trainer_cfg.get("val_check_interval", 50),
        check_val_every_n_epoch=None, limit_val_batches=trainer_cfg.get("limit_val_batches", 8),
        num_sanity_val_steps=0, gradient_clip_val=trainer_cfg.get("gradient_clip_val", 1.0),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    print_cpu()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "train" / "default.yaml"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 keeps CPU time meaningful on a shared machine "
                             "(idle OpenMP threads spin and inflate CPU time when cores are oversubscribed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(Path(args.config).read_text())
    data = TextDataModule(**config.get("data", {}))
    data.prepare_data()
    data.setup("fit")
    total_steps = sum(s["steps"] for s in config["model"]["stages"])

    times = {"without": [], "with": []}
    cpu = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        last_run = None
        for repeat in range(args.repeats):
            for kind in ("without", "with"):
                root = Path(tmp) / f"{kind}-{repeat}"
                wall, cpu_s = fit_once(config, data, args.steps, kind == "with", root)
                times[kind].append(wall)
                cpu[kind].append(cpu_s)
                print(f"  repeat {repeat} {kind:>7} callback: wall {wall:.1f} s, CPU {cpu_s:.1f} s", flush=True)
                if kind == "with":
                    last_run = root
        started, cpu_started = time.perf_counter(), time.process_time()
        render_run(last_run)
        render_seconds, render_cpu = time.perf_counter() - started, time.process_time() - cpu_started

    without, with_cb = statistics.median(times["without"]), statistics.median(times["with"])
    cpu_without, cpu_with = statistics.median(cpu["without"]), statistics.median(cpu["with"])
    snapshots = args.steps // 50 + 1
    print(f"config {args.config}, {args.steps} steps, snapshot every 50 steps ({snapshots} snapshots incl. step 0), "
          f"{args.repeats} interleaved repeats, medians:")
    print(f"  fit without callback: {without:.1f} s   with callback: {with_cb:.1f} s   "
          f"ratio with/without = {with_cb / without:.3f}  (overhead {100 * (with_cb / without - 1):.1f}%)")
    print(f"  CPU time without: {cpu_without:.1f} s   with: {cpu_with:.1f} s   "
          f"ratio with/without = {cpu_with / cpu_without:.3f}  (overhead {100 * (cpu_with / cpu_without - 1):.1f}%; "
          f"CPU time is robust to other processes sharing the cores)")
    for label, base, extra, render in (("wall", without, with_cb - without, render_seconds),
                                       ("CPU", cpu_without, cpu_with - cpu_without, render_cpu)):
        full_run = base / args.steps * total_steps
        snapshot_cost = max(extra, 0.0) / snapshots
        full_overhead = (snapshot_cost * (total_steps // 50 + 1) + render) / full_run
        print(f"  {label}: end-of-fit render (plots + report) {render:.1f} s; projected for the full default run "
              f"({total_steps} steps, ~{full_run:.0f} s): snapshots + render = {100 * full_overhead:.1f}% of training")


if __name__ == "__main__":
    main()
