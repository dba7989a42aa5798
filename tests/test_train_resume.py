"""Resuming training from a checkpoint (`python -m sparse_viz.train --ckpt_path ...`).

Two in-process runs of `configs/train/tiny.yaml` (25 steps: dense 0-9, warmup 10-14, sparse
15-24): an uninterrupted one that saves a checkpoint after `RESUME_STEP` updates, and one resumed
from that checkpoint. Specified here: the resumed run starts from exactly the checkpointed
weights, optimizer and learning-rate state (which are the uninterrupted run's state at that
step), continues the step count, schedule and learning rates, and its first loss is the
checkpointed model's loss on the batch it is given.

The data order is part of the checkpoint (`sparse_viz.data.resumable`): the resumed run's update
`RESUME_STEP + i` trains on the batch the uninterrupted run trained on at that update, so its
losses are the uninterrupted run's, to the last bit (same single-threaded CPU operations on the
same values; `test_train_interrupt.py` checks the final weights the same way).
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from sparse_viz.train import run_training
from sparse_viz.training import DSALightningModule

pytestmark = pytest.mark.slow  # two short training runs: ~11 s on an idle 2-core machine, ~25 s shared

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml")
RESUME_STEP = 12  # inside the warm-up stage, so the resumed run also crosses a stage boundary
TOTAL_STEPS = 25  # tiny.yaml: 10 + 5 + 10


class RecordTraining(L.Callback):
    """Records what a run did, step by step, for the resume tests.

    Args:
        save_at: after this many updates, save a checkpoint to `save_path` (as ModelCheckpoint
            does, from on_train_batch_end) and keep a copy of the live weights and optimizer state.
        save_path: where that checkpoint goes.
    """

    def __init__(self, save_at: int = -1, save_path: str = "") -> None:
        self.save_at, self.save_path = save_at, save_path
        self.start_step: int | None = None
        self.start_state: dict | None = None
        self.start_optimizer: dict | None = None
        self.start_scheduler: dict | None = None
        self.saved_state: dict | None = None
        self.saved_optimizer: dict | None = None
        self.batches: dict[int, torch.Tensor] = {}  # update step -> the batch it trained on
        self.losses: dict[int, float] = {}  # update step -> the loss training_step returned
        self.rates: dict[int, list[float]] = {}  # update step -> every parameter group's lr
        self.stages: dict[int, str] = {}  # update step -> the stage it trained in

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        self.start_state = copy.deepcopy(pl_module.state_dict())
        self.start_optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.start_scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.batches[step] = batch.detach().clone()
        self.rates[step] = [group["lr"] for group in trainer.optimizers[0].param_groups]
        self.stages[step] = pl_module.current_stage.name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.save_path)
            self.saved_state = copy.deepcopy(pl_module.state_dict())
            self.saved_optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def recorder(cli) -> RecordTraining:
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordTraining)]
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted recorder, resumed recorder, checkpoint path)."""
    root = tmp_path_factory.mktemp("resume")
    checkpoint = root / f"step{RESUME_STEP}.ckpt"
    common = ["--config", TINY, "--run_root", str(root / "runs"), f"--data.cache_dir={root / 'cache'}",
              "--trainer.enable_progress_bar=false", "--trainer.callbacks+=test_train_resume.RecordTraining"]
    uninterrupted = run_training([*common, "--run_name", "uninterrupted",
                                  f"--trainer.callbacks.save_at={RESUME_STEP}",
                                  f"--trainer.callbacks.save_path={checkpoint}"])
    resumed = run_training([*common, "--run_name", "resumed", "--ckpt_path", str(checkpoint)])
    return recorder(uninterrupted), recorder(resumed), checkpoint


def assert_same_tensors(actual, expected, where: str = "") -> None:
    """Nested dicts / lists / tensors / numbers equal exactly (tensors bit for bit)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same_tensors(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tensors(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def step_loss(checkpoint: Path, batch: torch.Tensor, step: int) -> float:
    """The training loss of update `step` on `batch` for the checkpoint's weights, recomputed
    outside Lightning: LM cross-entropy if the step's stage trains the main model, plus the
    indexer KL summed over layers times `indexer_loss_weight` (the DSA recipe, REFERENCE §1)."""
    module = DSALightningModule.load_from_checkpoint(checkpoint, map_location="cpu")
    stage = module.schedule.locate(step)[1]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        out = module.model(inputs, attention=stage.attention, indexer_loss=stage.indexer_loss)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten()) if stage.trains_main else 0.0
        loss = loss + module.hparams.indexer_loss_weight * out.indexer_kl.sum()
    return float(loss)


def test_checkpoint_holds_the_uninterrupted_runs_state_at_the_resume_step(runs):
    uninterrupted, _, checkpoint = runs
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == RESUME_STEP
    assert_same_tensors(saved["state_dict"], uninterrupted.saved_state, "state_dict")
    assert_same_tensors(saved["optimizer_states"][0], uninterrupted.saved_optimizer, "optimizer")
    # training moved every stage's weights away from the initial ones (so "equal to the
    # checkpoint" below cannot be met by a run that starts over from the same seed)
    moved = [name for name, value in saved["state_dict"].items()
             if not torch.equal(value, uninterrupted.start_state[name])]
    assert any(".indexer." in name for name in moved) and any(".indexer." not in name for name in moved)


def test_resumed_run_starts_from_the_checkpointed_weights_and_optimizer_state(runs):
    _, resumed, checkpoint = runs
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert resumed.start_step == RESUME_STEP
    assert_same_tensors(resumed.start_state, saved["state_dict"], "state_dict")
    # AdamW moments and step counts of every parameter, and the parameter groups' settings
    assert_same_tensors(resumed.start_optimizer, saved["optimizer_states"][0], "optimizer")
    # AdamW counted 10 updates of the main model (frozen in the warm-up stage) and 12 of the indexer
    assert {int(s["step"]) for s in resumed.start_optimizer["state"].values()} == {10, RESUME_STEP}
    assert resumed.start_scheduler["last_epoch"] == RESUME_STEP


def test_resumed_run_continues_the_step_count_schedule_and_learning_rates(runs):
    uninterrupted, resumed, _ = runs
    assert sorted(uninterrupted.losses) == list(range(TOTAL_STEPS))
    assert sorted(resumed.losses) == list(range(RESUME_STEP, TOTAL_STEPS))  # no step repeated or skipped
    for step in range(RESUME_STEP, TOTAL_STEPS):
        assert resumed.stages[step] == uninterrupted.stages[step], step
        assert resumed.rates[step] == uninterrupted.rates[step], step
    assert [resumed.stages[s] for s in (RESUME_STEP, 14, 15)] == ["warmup", "warmup", "sparse"]


def test_first_loss_after_resume_is_the_checkpointed_models_loss_on_the_same_batch(runs):
    uninterrupted, resumed, checkpoint = runs
    # the uninterrupted run's update RESUME_STEP, on its own batch, recomputed from the checkpoint
    expected = step_loss(checkpoint, uninterrupted.batches[RESUME_STEP], RESUME_STEP)
    assert uninterrupted.losses[RESUME_STEP] == pytest.approx(expected, rel=1e-5)
    assert resumed.losses[RESUME_STEP] == pytest.approx(expected, rel=1e-5)


def test_resumed_run_trains_on_the_uninterrupted_runs_batches_with_the_same_losses(runs):
    uninterrupted, resumed, _ = runs
    for step in range(RESUME_STEP, TOTAL_STEPS):
        assert torch.equal(resumed.batches[step], uninterrupted.batches[step]), step
        assert resumed.losses[step] == uninterrupted.losses[step], step  # bit for bit, see the module docstring
