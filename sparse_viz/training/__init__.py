"""Lightning training of the DSA transformer: stages, losses, optimisers."""

from sparse_viz.training.module import DSALightningModule, default_stages
from sparse_viz.training.stages import STAGE_NAMES, Schedule, Stage

__all__ = ["DSALightningModule", "Schedule", "Stage", "STAGE_NAMES", "default_stages"]
