"""Two processes on CPU (DDP over gloo), as `python -m sparse_viz.train --trainer.devices=2
--trainer.strategy=ddp --trainer.accelerator=cpu` runs them.

Checked against independent references: the run directory against what is on disk; the
validation loss against a single-process cross-entropy, computed here, of the checkpoint's model
on the same sequences (each process validates a disjoint half: `limit_val_batches=1` of 8
sequences on each of 2 processes covers validation sequences 0-15); resume against an
uninterrupted 2-process run, bit for bit (gloo sums the two processes' gradients in the same
order every run, so the floats are reproducible, see test_train_interrupt.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from sparse_viz.data import TextDataModule
from sparse_viz.training import DSALightningModule

pytestmark = pytest.mark.slow  # three 2-process runs: ~100 s on a shared 2-core machine

TESTS = Path(__file__).resolve().parent
TINY = str(TESTS.parent / "configs" / "train" / "tiny.yaml")
STEPS, STOP_AT = 6, 4


class RecordRunDir(L.Callback):
    """Writes the run directory this process uses to `<out>/rank<global rank>.txt`."""

    def __init__(self, out: str = "") -> None:
        self.out = out

    def setup(self, trainer, pl_module, stage) -> None:
        Path(self.out, f"rank{trainer.global_rank}.txt").write_text(str(trainer.default_root_dir))


def run_ddp(root: Path, cache: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_VIZ_RUN_DIR", None)
    command = [sys.executable, "-m", "sparse_viz.train", "--config", TINY, "--run_root", str(root),
               f"--data.cache_dir={cache}", "--trainer.devices=2", "--trainer.strategy=ddp",
               "--trainer.accelerator=cpu", f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3",
               "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--checkpoint_every_n_steps=2",
               *extra]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def announced(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run directory: ")]


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "train/tokens_per_s"} for row in csv.DictReader(handle)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The uninterrupted 2-process run, and one stopped by SIGINT in rank 0 only and resumed."""
    base = tmp_path_factory.mktemp("ddp")
    cache = base / "cache"
    whole = run_ddp(base / "whole", cache, "--trainer.callbacks+=test_train_ddp.RecordRunDir",
                    f"--trainer.callbacks.out={base}", cwd=base)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = run_ddp(base / "stopped", cache, "--trainer.callbacks+=test_train_interrupt.SignalAtStep",
                      f"--trainer.callbacks.step={STOP_AT}", "--trainer.callbacks.rank=0", cwd=base)
    resume = [line.split("resume with: ", 1)[1] for line in stopped.stdout.splitlines() if line.startswith("resume with: ")]
    assert len(resume) == 1, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    command = resume[0].split()
    assert command[:3] == ["python", "-m", "sparse_viz.train"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=base, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base, cache, whole, stopped, resumed


def test_two_processes_write_one_run_directory_and_announce_it_once(ddp):
    base, _, whole, _, _ = ddp
    made = [p for p in (base / "whole").iterdir()]
    assert len(made) == 1 and made[0].is_dir()  # rank 1 did not make (or name) another one
    assert announced(whole) == [str(made[0])]
    # and both processes used it (a sharded checkpoint, e.g. FSDP's, is written by every process)
    assert [(base / f"rank{r}.txt").read_text() for r in (0, 1)] == [str(made[0])] * 2
    assert (made[0] / "checkpoints" / "last.ckpt").is_file() and (made[0] / "metrics.csv").is_file()


def test_validation_loss_of_two_processes_is_the_single_process_loss_on_the_same_sequences(ddp):
    base, cache, whole, _, _ = ddp
    run_dir = Path(announced(whole)[0])
    logged = [(int(r["step"]), float(r["val/loss"])) for r in rows(run_dir) if r.get("val/loss")]
    assert logged[-1][0] == STEPS - 1  # validated after the last update, with last.ckpt's weights
    module = DSALightningModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    data = TextDataModule(seq_len=64, batch_size=8, vocab_size=512, cache_dir=str(cache))  # tiny.yaml's data
    sequences = torch.cat([batch for batch, _ in zip(data.val_dataloader(), range(2))])  # (16, 65), one process
    attention = module.schedule.locate(STEPS)[1].attention
    with torch.no_grad():
        logits = module.model(sequences[:, :-1], attention=attention).logits
    expected = F.cross_entropy(logits.flatten(0, 1).double(), sequences[:, 1:].flatten(), reduction="mean").item()
    assert logged[-1][1] == pytest.approx(expected, rel=1e-5)


def test_selection_callback_records_once_per_snapshot_from_rank_0(ddp):
    base, _, whole, _, _ = ddp
    run_dir = Path(announced(whole)[0])
    lines = (run_dir / "analysis" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, STEPS]  # every_n_steps=50: first and last


def test_two_process_run_stopped_in_rank_0_and_resumed_ends_as_the_uninterrupted_one(ddp):
    base, _, whole, stopped, resumed = ddp
    assert stopped.returncode == 130, stopped.stderr[-3000:]  # SIGINT's exit status
    (stopped_dir,) = [p for p in (base / "stopped").iterdir()]
    assert announced(stopped) == [str(stopped_dir)] and announced(resumed) == [str(stopped_dir)]
    assert f"interrupted by SIGINT after step {STOP_AT}" in stopped.stdout
    whole_dir = Path(announced(whole)[0])
    expected, actual = weights(whole_dir), weights(stopped_dir)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    assert rows(stopped_dir) == rows(whole_dir)
