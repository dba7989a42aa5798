"""The callback inside a real training run: a run killed (SIGKILL) after some snapshots and
resumed from its checkpoint has exactly one history line per snapshot step, and the finished
run ends with report.html and both PNGs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import selection_reference as ref

from sparse_viz.tracking.store import RunStore

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
CALLBACK = "sparse_viz.tracking.callback.SelectionAnalysisCallback"


class KillAtStep(L.Callback):
    """Kill the whole process (no cleanup, like a pre-empted job) after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "sparse_viz.train", "--config", str(TINY), f"--data.cache_dir={cache}",
               "--trainer.enable_progress_bar=false", f"--trainer.callbacks+={CALLBACK}",
               "--trainer.callbacks.every_n_steps=5", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill_and_resume_has_exactly_one_line_per_snapshot_step(tmp_path):
    cache, root = tmp_path / "cache", tmp_path / "runs"
    killed = train(["--run_root", str(root), "--run_name", "r", "--trainer.callbacks+=test_tracking_resume.KillAtStep",
                    "--trainer.callbacks.step=17", "--checkpoint_every_n_steps=10"], cache)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = root / "r"
    store = RunStore(run)
    assert store.steps() == [0, 5, 10, 15]
    assert not (run / "report.html").exists()
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    resumed = train(["--ckpt_path", str(checkpoint)], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = store.history_path.read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [0, 5, 10, 15, 20, 25]  # tiny.yaml: 10 + 5 + 10 steps; 15 not written twice
    assert all(store.snapshot_path(s).is_file() for s in steps)
    history = store.read_history()
    # a snapshot at step s is taken after s updates, in the stage of update s + 1 (tiny.yaml:
    # dense 0-9, warmup 10-14, sparse 15-24)
    assert [r["stage"] for r in history] == ["dense", "dense", "warmup", "sparse", "sparse", "sparse"]
    assert history[-1]["selection_source"] == "attention" and history[0]["selection_source"] == "indexer_topk"
    assert history[-1]["val_loss"] is not None
    for record in history:
        assert record["mass_at_k_oracle"] >= record["mass_at_k_random"] - 1e-6
        assert record["mass_at_k_oracle"] >= record["mass_at_k"] - 1e-6
    # Jaccard with the previous snapshot, recomputed from the stored selections: the first
    # snapshot has none, and the first one after the resume (20) compares with the last one the
    # killed process stored (15), which the resumed callback reads back from disk.
    k = store.read_probe()["top_k"]
    assert history[0].get("L0/jaccard_prev") is None
    for before, after in zip(history, history[1:]):
        old_sel = store.load_snapshot(before["step"])["selected"].tolist()  # (L, P, T, k)
        new_sel = store.load_snapshot(after["step"])["selected"].tolist()
        for layer in range(len(new_sel)):
            P, T = len(new_sel[layer]), len(new_sel[layer][0])
            expected = ref.mean_over_informative(
                lambda b, t: ref.jaccard(new_sel[layer], old_sel[layer], b, t), P, T, k)
            assert after.get(f"L{layer}/jaccard_prev") == pytest.approx(expected, rel=1e-6), (after["step"], layer, sorted(after))
    # the end of fit rendered the report and the plots from what was recorded
    for name in ("report.html", "plots/attention_patterns.png", "plots/indexer_behavior.png",
                 "plots/selection/step_0000025.png"):
        assert (run / name).is_file(), name
    # scalars also reached the Lightning logger (CSV)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "selection/mass_at_k" in header and "selection/L1/indexer_kl" in header
