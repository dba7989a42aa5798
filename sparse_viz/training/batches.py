"""What a training batch is: a text tensor, or a dict with a per-position loss mask.

Two kinds of batch reach `DSALightningModule`:

- a LongTensor (B, T + 1) of packed text (`TextDataModule`): the loss counts at every position;
- a dict (`RecallDataModule`) with `tokens` (B, T + 1) and `loss_mask` (B, T) bool: the loss,
  and the answer accuracy, count only where the mask is True (other keys, e.g. `ground_truth`,
  are carried along for whoever reads them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs (B, T), targets (B, T), loss_mask (B, T) bool or None) of either kind of batch."""
    if isinstance(batch, Mapping):
        tokens = batch["tokens"]
        mask = batch.get("loss_mask")
        return tokens[:, :-1], tokens[:, 1:], None if mask is None else mask.bool()
    return batch[:, :-1], batch[:, 1:], None


def batch_tokens(batch) -> int:
    """Number of input tokens in a batch of either kind (for tokens/s)."""
    tokens = batch["tokens"] if isinstance(batch, Mapping) else batch
    return int(tokens[:, :-1].numel()) if hasattr(tokens, "numel") else 0


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                         reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy over the positions where `mask` is True (all positions when None).

    Args:
        logits: (B, T, V).
        targets: (B, T) long.
        mask: (B, T) bool or None.
        reduction: `mean` or `sum` over the counted positions.

    Returns:
        (loss, number of counted positions); the mean of no position is 0 (with a graph).
    """
    flat_logits, flat_targets = logits.flatten(0, 1).float(), targets.flatten()  # (B*T, V), (B*T,)
    if mask is not None:
        keep = mask.flatten()
        flat_logits, flat_targets = flat_logits[keep], flat_targets[keep]
    count = int(flat_targets.numel())
    if count == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(flat_logits, flat_targets, reduction=reduction), count


def answer_hits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(correct argmax predictions, positions) over the masked positions."""
    correct = (logits.argmax(dim=-1) == targets) & mask  # (B, T)
    return int(correct.sum()), int(mask.sum())
