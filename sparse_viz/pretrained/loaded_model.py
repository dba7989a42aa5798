"""A model ready for probing: the module, its tokenizer, its adapter, where and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparse_viz.pretrained.adapter import ArchitectureAdapter


@dataclass
class LoadedModel:
    """A model ready for probing: eval mode, on `device`, in `dtype`."""

    model: nn.Module
    tokenizer: Any
    adapter: ArchitectureAdapter
    device: torch.device
    dtype: torch.dtype
    name_or_path: str
