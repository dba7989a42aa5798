"""Lightning's rich progress bar, labelled for step-scheduled training.

Training here is scheduled in steps (the stages' sum), with `max_epochs = -1`; the stock bar
then reads "Epoch 0/-2". This one reads "Epoch 0" and names the step budget instead.
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


def use_steps_progress_bar(trainer) -> None:
    """Swap the trainer's stock RichProgressBar (if it has one) for a StepsProgressBar."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = StepsProgressBar(refresh_rate=callback._refresh_rate, leave=callback._leave,
                                                    theme=callback.theme, console_kwargs=callback._console_kwargs)
