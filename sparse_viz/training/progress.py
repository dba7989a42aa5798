"""Lightning's rich progress bar, labelled for step-scheduled training.

Training here is scheduled in steps (the stages' sum), with `max_epochs = -1`; the stock bar
then reads "Epoch 0/-2". This one reads "Epoch 0" and names the step budget instead.

The stock bar also sizes an epoch as `min(epoch length, max_steps - global_step)` when the epoch
starts, while it counts batches from the epoch's first one. A run resumed part-way through an
epoch then overflows ("800/699"): this one sizes the epoch from its first batch too.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepsProgressBar(RichProgressBar):
    """`RichProgressBar` whose description shows the step budget, not a bogus epoch count."""

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
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            total = min(total, batch_idx + remaining)
        if self.progress.tasks[self.train_progress_bar_id].total != total:
            self.progress.update(self.train_progress_bar_id, total=total)


def use_steps_progress_bar(trainer) -> None:
    """Swap the trainer's stock RichProgressBar (if it has one) for a StepsProgressBar."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = StepsProgressBar(refresh_rate=callback._refresh_rate, leave=callback._leave,
                                                    theme=callback.theme, console_kwargs=callback._console_kwargs)
