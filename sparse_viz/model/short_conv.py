"""A causal short convolution on each block's attention input (a "Canon" layer / Zoology's BaseConv).

    h_t <- h_t + sum_{j=0}^{K-1} w_j * h_{t-j}        (depthwise: one K-tap filter per channel)

Why it is here: multi-query associative recall needs every value token to know the key just
before it. With attention alone that takes a previous-token head in one layer composed with a
matching head in the next, and a small model sits on a long plateau before the two form
together (measured in experiments/recall: no dense model left chance at T >= 64 in 3000 steps).
A K-tap causal filter hands each position its K - 1 predecessors directly, the way Zoology's
MQAR models (a short convolution before attention) and Allen-Zhu's "Canon layers" do, and
recall is then learnt in ~1000 steps. Attention and the Lightning Indexer read the same
filtered input, so the indexer can find a value by the key beside it.

`short_conv_reference` is the readable loop the module is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalShortConv(nn.Module):
    """h + a depthwise causal convolution of h along the sequence.

    Args:
        d_model: channels (the residual width).
        kernel_size: taps K (>= 1); position t reads positions t - K + 1 .. t.
    """

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        # PyTorch's default Conv1d initialisation (uniform, +-1/sqrt(K)): the one measured to learn recall.
        self.conv = nn.Conv1d(d_model, d_model, self.kernel_size, groups=d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args: h (B, T, d_model). Returns: (B, T, d_model), row t from rows <= t only."""
        padded = F.pad(h.transpose(1, 2), (self.kernel_size - 1, 0))  # (B, d, K - 1 + T): zeros before t = 0
        return h + self.conv(padded).transpose(1, 2)


def short_conv_reference(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same as `CausalShortConv` written as a loop over positions and taps.

    Args:
        h: (B, T, d).
        weight: (d, 1, K), the module's `conv.weight` (tap K - 1 multiplies h_t, tap 0 h_{t-K+1}).

    Returns:
        (B, T, d).
    """
    B, T, d = h.shape
    K = weight.shape[-1]
    out = h.clone()
    for t in range(T):
        for j in range(K):  # j = how far back
            if t - j >= 0:
                out[:, t] += weight[:, 0, K - 1 - j] * h[:, t - j]
    return out
