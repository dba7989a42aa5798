"""The DeepSeek Sparse Attention training schedule: named stages, each with its own steps and
learning rates (DeepSeek-V3.2-Exp tech report §2.1, REFERENCE.md §1).

- `dense`: the main model trains with dense attention (LM loss); the indexer, if the model has
  one and `train_indexer` is on, learns alongside from the KL target on a detached input, so it
  never changes the main model.
- `warmup` (DeepSeek stage 1): main model frozen, dense attention, the indexer trained with
  KL(p || softmax(I)) over all causal keys.
- `sparse` (DeepSeek stage 2): top-k attention; the main model learns from the LM loss only and
  the indexer from KL over the selected set only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STAGE_NAMES = ("dense", "warmup", "sparse")


@dataclass
class Stage:
    """One stage of the schedule.

    Args:
        name: `dense`, `warmup` or `sparse`.
        steps: optimizer steps spent in this stage (> 0).
        lr: peak learning rate of the main model (ignored in `warmup`, where it is frozen).
        indexer_lr: peak learning rate of the Lightning Indexer.
        warmup_steps: linear ramp at the start of the stage; then cosine decay to
            `min_lr_ratio` of the peak at the stage's end.
        min_lr_ratio: floor of the cosine decay, as a fraction of the peak.
        train_indexer: in `dense`, whether the indexer learns alongside (ignored elsewhere).
    """

    name: str
    steps: int
    lr: float = 3e-3
    indexer_lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    train_indexer: bool = True

    def validate(self) -> None:
        if self.name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.name!r}; choose one of {', '.join(STAGE_NAMES)}")
        if self.steps <= 0:
            raise ValueError(f"stage {self.name!r}: steps must be > 0, got {self.steps}")
        if self.lr < 0 or self.indexer_lr < 0:
            raise ValueError(f"stage {self.name!r}: learning rates must be >= 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stage {self.name!r}: warmup_steps must be in [0, steps]")

    @property
    def attention(self) -> str:
        """The attention the main model uses in this stage: `dense` or `sparse`."""
        return "sparse" if self.name == "sparse" else "dense"

    @property
    def trains_main(self) -> bool:
        return self.name != "warmup"

    @property
    def indexer_loss(self) -> str | None:
        """The model's `indexer_loss` mode in this stage (None: the indexer does not learn)."""
        if self.name == "sparse":
            return "selected"
        if self.name == "warmup" or self.train_indexer:
            return "all"
        return None

    def lr_factor(self, step_in_stage: int) -> float:
        """Multiplier of the peak learning rates at `step_in_stage` (0-based) of this stage."""
        if self.warmup_steps and step_in_stage < self.warmup_steps:
            return (step_in_stage + 1) / self.warmup_steps
        decay_steps = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step_in_stage - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class Schedule:
    """An ordered list of stages addressed by global step; past the end, the last stage holds."""

    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("the schedule needs at least one stage")
        for stage in stages:
            stage.validate()
        self.stages = list(stages)
        self.starts = [0]
        for stage in self.stages[:-1]:
            self.starts.append(self.starts[-1] + stage.steps)

    @property
    def total_steps(self) -> int:
        return self.starts[-1] + self.stages[-1].steps

    def locate(self, global_step: int) -> tuple[int, Stage, int]:
        """(stage index, stage, step within the stage) for a 0-based global step."""
        index = max(i for i, start in enumerate(self.starts) if start <= global_step)
        stage = self.stages[index]
        return index, stage, global_step - self.starts[index]

    def learning_rates(self, global_step: int) -> tuple[float, float]:
        """(main lr, indexer lr) at `global_step`; the main lr is 0 in `warmup`."""
        _, stage, offset = self.locate(global_step)
        offset = min(offset, stage.steps - 1)
        factor = stage.lr_factor(offset)
        main_lr = stage.lr * factor if stage.trains_main else 0.0
        indexer_lr = stage.indexer_lr * factor if stage.indexer_loss else 0.0
        return main_lr, indexer_lr
