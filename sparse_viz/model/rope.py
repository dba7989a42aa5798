"""Rotary position embedding, non-interleaved (half-split) layout.

The half-split layout rotates the pair (x[i], x[i + d/2]); the interleaved layout rotates
(x[2i], x[2i+1]). DeepSeek's indexer uses half-split (REFERENCE §1: the interleaved variant in
the first public code was a bug), and so does the main attention here, Llama-style.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_tables(dim: int, max_seq_len: int, theta: float, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables for positions start..max_seq_len-1.

    Args:
        dim: rotated width (even).
        max_seq_len: one past the last position.
        theta: RoPE base.
        start: the first position (a decode step needs only its own).

    Returns:
        (cos, sin), each (max_seq_len - start, dim // 2) float32: rows of the tables from 0 on.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
    angles = torch.arange(start, max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of `x` (half-split pairs) by position.

    Args:
        x: (..., T, d) with d == 2 * cos.shape[-1]; position is dim -2.
        cos, sin: (T, d/2); or (T, 1, d/2) for a token-major x (..., T, H, d).

    Returns:
        Tensor shaped like `x`.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first 2 * cos.shape[-1] dims of `x`; the rest passes through unchanged.

    Args:
        x: (..., T, d).
        cos, sin: (T, r/2) with r <= d.

    Returns:
        Tensor shaped like `x`.
    """
    rotated = 2 * cos.shape[-1]
    if rotated == 0:
        return x
    return torch.cat((apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the RoPE tables of one width; `forward(T)` returns the first T rows."""

    def __init__(self, dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        cos, sin = rope_tables(dim, max_seq_len, theta)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]  # (T, dim/2) each
