"""Lightning training: the DSA transformer (`DSALightningModule`) and Lightning Indexers
retrofitted onto a frozen pretrained model (`RetrofitLightningModule`); stages, losses, optimisers."""

from sparse_viz.training.module import DSALightningModule, StagedLightningModule, default_stages
from sparse_viz.training.retrofit_module import RetrofitLightningModule
from sparse_viz.training.stages import STAGE_NAMES, Schedule, Stage

__all__ = ["DSALightningModule", "RetrofitLightningModule", "Schedule", "Stage", "StagedLightningModule",
           "STAGE_NAMES", "default_stages"]
