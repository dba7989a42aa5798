"""Lightning's rich progress bar, labelled for step-scheduled training.

Training here is scheduled in steps (the stages' sum), with `max_epochs = -1`; the stock bar
then reads "Epoch 0/-2". This one reads "Epoch 0" and names the step budget instead.

The stock bar also sizes an epoch as `min(epoch length, max_steps - global_step)` when the epoch
starts, while it counts batches from the epoch's first one. A run resumed part-way through an
epoch then overflows ("800/699"): this one sizes the epoch from its first batch too.

A progress bar is drawn for a terminal: when the output goes to a file or a pipe (a job's log, a
run under nohup), rich draws it once, at the end. There this bar also writes a plain line
every `line_interval(max_steps)` steps and after each validation, flushed at once (rich's own
drawing still comes at the end, as before):

    step 30/800 (4%), stage dense: loss 5.8123, 3641 tokens/s
    validation at step 50/800: val/loss 5.6012
"""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import RichProgressBar

from sparse_viz.training.batches import batch_tokens

MAX_STEPS_BETWEEN_LINES = 50


def line_interval(max_steps: int | None) -> int:
    """Steps between two progress lines: a tenth of the run, but at least every 50 steps (a line
    a tenth of the way through a 10000-step run could be an hour away), and every step of a run
    shorter than 10."""
    if max_steps is None or max_steps <= 0:
        return MAX_STEPS_BETWEEN_LINES
    return max(1, min(MAX_STEPS_BETWEEN_LINES, math.ceil(max_steps / 10)))


class StepsProgressBar(RichProgressBar):
    """`RichProgressBar` whose description shows the step budget, not a bogus epoch count, and
    that writes plain progress lines where its output is not a terminal."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._line_step = -1  # the step of the last line written
        self._line_stage: str | None = None
        self._line_tokens, self._line_seconds = 0, 0.0  # of the steps since that line
        self._batch_started_at: float | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        if max_steps is not None and max_steps > 0:
            description += f" (max {max_steps} steps)"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"  # no flicker against "Validation"
        return description

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Size the epoch's bar once its position is known (`batch_idx` batches already done)."""
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        stage = getattr(pl_module, "current_stage", None)  # the stage this step trains in
        self._line_stage = getattr(stage, "name", None)
        self._batch_started_at = time.perf_counter()
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            total = min(total, batch_idx + remaining)
        if self.progress.tasks[self.train_progress_bar_id].total != total:
            self.progress.update(self.train_progress_bar_id, total=total)

    # ----------------------------------------------------------------- plain lines
    def writes_lines(self) -> bool:
        """Whether this bar writes plain lines: enabled (rank 0), and not drawing on a terminal or
        in a notebook."""
        if self.is_disabled:
            return False
        console = self._console
        if console is None:
            return not sys.stdout.isatty()
        return not (console.is_terminal or console.is_jupyter)

    def _write_line(self, line: str) -> None:
        if self._console is not None:  # through rich, which holds stdout while its bar is live
            self._console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
            self._console.file.flush()
        else:
            print(line, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._batch_started_at is not None:
            # tokens/s as the module logs it (train/tokens_per_s: step time only, every process),
            # over the steps since the last line instead of the last step alone
            self._line_seconds += time.perf_counter() - self._batch_started_at
            self._line_tokens += batch_tokens(batch) * trainer.world_size
            self._batch_started_at = None
        step, max_steps = trainer.global_step, trainer.max_steps
        if step == self._line_step or not self.writes_lines():  # gradient accumulation: one line per step
            return
        if step % line_interval(max_steps) and step != max_steps:
            return
        line = f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps and max_steps > 0 else f"step {step}"
        if self._line_stage:
            line += f", stage {self._line_stage}"
        parts = []
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if self._line_seconds > 0:
            parts.append(f"{self._line_tokens / self._line_seconds:.0f} tokens/s")
        self._write_line(line + (": " + ", ".join(parts) if parts else ""))
        self._line_step = step
        self._line_tokens, self._line_seconds = 0, 0.0

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or not self.writes_lines():
            return
        values = [f"{key} {float(value):.4f}" for key, value in trainer.callback_metrics.items() if key.startswith("val/")
                  and key != "val/stage"]
        if values:
            step, max_steps = trainer.global_step, trainer.max_steps
            where = f"{step}/{max_steps}" if max_steps and max_steps > 0 else f"{step}"
            self._write_line(f"validation at step {where}: {', '.join(values)}")


def use_steps_progress_bar(trainer) -> None:
    """Swap the trainer's stock RichProgressBar (if it has one) for a StepsProgressBar."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = StepsProgressBar(refresh_rate=callback._refresh_rate, leave=callback._leave,
                                                    theme=callback.theme, console_kwargs=callback._console_kwargs)
