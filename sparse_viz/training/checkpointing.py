"""`last.ckpt` every N steps and on Ctrl-C / SIGTERM, written so that a resume is exact.

A checkpoint written at the end of training step `b` (global step `b + 1`) is what Lightning
resumes from: it does not redo step `b`, nor a validation due at `b`. But the metrics of step `b`
(its `metrics.csv` row, the validation and snapshots due at `b`) are logged after that point.
So the checkpoint is first written beside `last.ckpt` (`last.ckpt.pending`) and becomes
`last.ckpt` (an atomic rename) only when step `b` is complete: at the start of the next step, or
at the end of training, after the loggers have flushed. A run killed at any moment (SIGKILL
included) leaves a `last.ckpt` whose every logged row is on disk, and a resume from it repeats
and skips nothing (the CSV logger drops rows at or after the checkpoint's step,
`ResumableCSVLogger`).

SIGINT and SIGTERM only set a flag. At the end of the current step every process agrees on it
(one all-reduce), writes the checkpoint, finishes the step's logging and validation, and stops
with `TrainingInterrupted` before the next step; `python -m sparse_viz.train` then prints the
run directory and the command that resumes it. A second Ctrl-C stops at once, as usual.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing `checkpoint` at global step `step`.

    Args:
        signum: the signal (SIGINT or SIGTERM).
        step: the global step the checkpoint resumes from.
        checkpoint: path of that checkpoint.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(signum, signum)} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StepCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt` every `every_n_steps` steps, at the end, and on interrupt.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_steps: steps between checkpoints (> 0), independent of validation.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.last = self.dirpath / "last.ckpt"
        self.pending = self.dirpath / "last.ckpt.pending"
        self._pending_step: int | None = None
        self._written_step: int | None = None
        self._requested: int | None = None  # the signal received, not yet acted on
        self._stop: TrainingInterrupted | None = None  # raised at the start of the next step
        self._previous_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self._requested is not None:
            # A second Ctrl-C: the user does not want to wait for the end of the step.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = signum

    def _install(self) -> None:
        # Installed at the start of training, after Lightning's own SIGTERM handler (registered
        # just before), which this one replaces: Lightning's would raise mid-validation, before a
        # checkpoint could be written. Restored at the end.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNAL_NAMES:
            self._previous_handlers[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any process received (0: none); every process gets the same answer."""
        requested = self._requested or 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([requested], dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = int(flag.item())
        return requested

    # ------------------------------------------------------------------ writing
    def _write_pending(self, trainer: L.Trainer) -> None:
        # every process (a collective); rank 0 writes. A full checkpoint (optimizer and loop state:
        # resuming needs them), said explicitly: Lightning logs a line per save where it is left unset.
        trainer.save_checkpoint(self.pending, weights_only=False)
        self._pending_step = self._written_step = trainer.global_step

    def _promote(self, trainer: L.Trainer) -> None:
        """Make the pending checkpoint `last.ckpt`, once its step's rows are on disk."""
        if self._pending_step is None:
            return
        for logger in trainer.loggers:
            logger.save()
        trainer.strategy.barrier("StepCheckpoint.promote")
        if trainer.is_global_zero:
            os.replace(self.pending, self.last)
        self._pending_step = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested, self._stop = None, None
        self._install()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._promote(trainer)  # the previous step is complete: logged, validated, flushed
        if self._stop is not None:
            raise self._stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        step = trainer.global_step
        done = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if signum or done or step % self.every_n_steps == 0:
            self._write_pending(trainer)
        if signum and not done:
            self._stop = TrainingInterrupted(signum, step, self.last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self._written_step != trainer.global_step:
            self._write_pending(trainer)  # training ended other than by max_steps (e.g. max_epochs)
        self._promote(trainer)
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A pending checkpoint whose step did not complete is not promoted: last.ckpt stays the
        # previous complete one. TrainingInterrupted is raised only once its step is promoted.
        self._restore()


def use_step_checkpoint(trainer: L.Trainer, dirpath: Path, every_n_steps: int) -> StepCheckpoint | None:
    """Give `trainer` a `StepCheckpoint` in place of the `ModelCheckpoint` Lightning adds by default.

    Args:
        trainer: a trainer just built (its callbacks are edited in place).
        dirpath: the run's checkpoint folder.
        every_n_steps: steps between checkpoints.

    Returns:
        The callback, or None when the trainer was built with `enable_checkpointing=False`.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    if not trainer.checkpoint_callbacks:
        return None  # enable_checkpointing=False
    # Lightning's default one (added when the config names none) would write a second, full
    # checkpoint at every epoch end; one that the config names is the user's and stays.
    trainer.callbacks[:] = [c for c in trainer.callbacks if not _is_default_model_checkpoint(c, ModelCheckpoint)]
    callback = StepCheckpoint(dirpath, every_n_steps)
    trainer.callbacks.append(callback)
    return callback


def _is_default_model_checkpoint(callback, model_checkpoint_type) -> bool:
    return (type(callback) is model_checkpoint_type and callback.dirpath is None and callback.monitor is None
            and callback.save_last is None and callback._every_n_train_steps == 0)
