"""Causal self-attention, dense or restricted to a per-query selection of keys.

Three ways to attend, with one meaning:
- `dense_causal_attention`: every past key; PyTorch's fused SDPA (fast path, no probabilities).
- `masked_sparse_attention`: dense scores with -inf outside the selection (the readable
  reference; O(T^2) memory).
- `gathered_sparse_attention`: only the k selected keys/values of each query are touched
  (O(T*k) memory); same results as the masked path. Three kernels: a fused C++ kernel
  (`fused_kernels.py`, CPU), sparse CSR products (`csr_attention.py`, CPU) and plain gathered
  copies in query chunks (`gathered_by_copy`, any device).

The selection (B, T, k) is shared by every head of the layer (REFERENCE §1). Keys and values may
have fewer heads than queries (grouped-query attention, as DeepSeek runs DSA on MLA's one shared
key-value entry): query head h reads key/value head h // (H / HKV).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .csr_attention import SelectionPattern, csr_kernels_available, csr_selected_attention
from .fused_kernels import fused_kernels_available, fused_selected_attention
from .rope import apply_rope

ATTENTION_CHUNK = 256  # queries per chunk in the gathered path: bounds its (B, Tc, k, C) buffers


def kv_groups(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per key/value head; ValueError when n_kv_heads does not divide n_heads."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"{n_kv_heads} key/value heads do not divide {n_heads} query heads")
    return n_heads // n_kv_heads


def expand_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values of HKV heads repeated for H query heads (the identity when HKV == H).

    Args:
        x: (B, HKV, T, hd), HKV dividing n_heads.
        n_heads: H.

    Returns:
        (B, H, T, hd): head h is x's head h // (H / HKV).
    """
    groups = kv_groups(n_heads, x.shape[1])
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dense causal softmax(q k^T / sqrt(hd)).

    Args:
        q: (B, H, T, hd).
        k: (B, HKV, T, hd), HKV dividing H.

    Returns:
        (B, H, T, T) probabilities; zero for future keys.
    """
    T = q.shape[-2]
    k = expand_kv_heads(k, q.shape[1])  # (B, H, T, hd)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention through fused SDPA (the fast path when no probabilities are needed).

    Args:
        q: (B, H, T, hd).
        k, v: (B, HKV, T, hd), HKV dividing H.

    Returns:
        (B, H, T, hd).
    """
    grouped = kv_groups(q.shape[1], k.shape[1]) > 1  # the same error as every other path for a bad head count
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)


def selection_mask(selected: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean (B, T, T) matrix, True at (t, s) when s is among t's selected keys.

    Args:
        selected: (B, T, k) long, -1 = unfilled slot.
        seq_len: T.
    """
    B, T, _ = selected.shape
    allowed = torch.zeros(B, T, seq_len + 1, dtype=torch.bool, device=selected.device)
    # Unfilled slots write into a spare last column that is then dropped.
    allowed.scatter_(-1, selected.masked_fill(selected < 0, seq_len), True)
    return allowed[..., :seq_len]


def gather_selected(dense: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Read a (..., T, T) key-space tensor at the selected keys.

    Args:
        dense: (B, H, T, T) or (B, T, T).
        selected: (B, T, k) long, -1 = unfilled slot (read as 0).

    Returns:
        (B, H, T, k) or (B, T, k); unfilled slots hold 0.
    """
    index = selected.clamp(min=0)
    valid = selected >= 0
    if dense.dim() == 4:
        index, valid = index[:, None], valid[:, None]
        index = index.expand(dense.shape[0], dense.shape[1], *index.shape[2:])
    return dense.gather(-1, index).masked_fill(~valid, 0.0)


def scatter_selected(values: torch.Tensor, selected: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of `gather_selected`: (B, H, T, k) values into a zero (B, H, T, T) key space."""
    B, H, T, k = values.shape
    out = values.new_zeros(B, H, T, seq_len + 1)
    index = selected.masked_fill(selected < 0, seq_len)[:, None].expand(B, H, T, k)
    out.scatter_(-1, index, values)
    return out[..., :seq_len]


def rows_ascending(selected: torch.Tensor) -> bool:
    """True when every row of (B, T, k) holds its valid keys strictly ascending, then the -1 slots."""
    T = selected.shape[1]
    ordered = selected.masked_fill(selected < 0, T + 1)  # unfilled slots sort last
    later, earlier = ordered[..., 1:], ordered[..., :-1]
    return bool(((later > earlier) | ((later == T + 1) & (earlier == T + 1))).all())


def masked_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, return_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference sparse attention: dense scores, -inf outside each query's selection.

    Args:
        q: (B, H, T, hd).
        k, v: (B, HKV, T, hd), HKV dividing H.
        selected: (B, T, k) long, causal, -1 = unfilled; shared by all heads.
        return_probs: also return the probabilities.

    Returns:
        out: (B, H, T, hd).
        probs: (B, H, T, T) (zero off the selection) or None.
    """
    T = q.shape[-2]
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])  # (B, H, T, hd)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    allowed = selection_mask(selected, T)[:, None]  # (B, 1, T, T)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (B, H, T, T)
    return probs @ v, (probs if return_probs else None)


def gathered_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    return_probs: bool = False,
    chunk_size: int = ATTENTION_CHUNK,
    kernel: str = "auto",
    check_order: bool = True,
    pattern: SelectionPattern | None = None,
    sum_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse attention that touches only the selected keys: O(T * k) scores and memory.

    Args:
        q: (B, H, T, hd).
        k, v: (B, HKV, T, hd), HKV dividing H (the fused kernel reads each key/value head once
            for its group of query heads; the other kernels repeat them).
        selected: (B, T, k) long, causal, -1 = unfilled; shared by all heads. The fused kernel
            also reads int32 (the model hands it one: half the memory kept for backward).
        return_probs: also return the probabilities in selection layout.
        chunk_size: queries per chunk of the `copy` kernel.
        kernel: "fused" = the fused C++ kernel (CPU, `fused_kernels.py`; O(T) saved for
            backward); "csr" = sparse CSR products reading the selected rows in place (CPU, see
            `csr_attention.py`); "copy" = gather copies of the selected rows, chunk by chunk;
            "auto" = fused where it is built (CPU), else csr where available and the rows are in
            `select_keys` order (ascending, -1 last), else copy.
        check_order: verify that order before using csr; the model skips it for selections it
            got from `select_keys` (a handful of small ops saved per layer).
        pattern: the csr kernel's `SelectionPattern(selected)`, when the caller shares it with
            other kernels reading the same selection (the indexer's selected-key scores).
        sum_heads: return the probabilities summed over heads (what the indexer's KL reads).

    Returns:
        out: (B, H, T, hd).
        probs: (B, H, T, k), probs[b, h, t, j] = weight of key selected[b, t, j] (0 on
            unfilled slots); (B, T, k) with sum_heads; or None.
    """
    if kernel not in ("auto", "fused", "csr", "copy"):
        raise ValueError(f"kernel must be auto, fused, csr or copy, got {kernel!r}")
    kv_groups(q.shape[1], k.shape[1])  # a head count that does not divide: one clear error, whatever the kernel
    if kernel == "fused" or (kernel == "auto" and fused_kernels_available(q)):
        out, probs = fused_selected_attention(q, k, v, selected, per_head_probs=return_probs and not sum_heads)
        return out, (probs if return_probs else None)
    out, probs = _gathered_per_head(q, k, v, selected, return_probs, chunk_size, kernel, check_order, pattern)
    if sum_heads and probs is not None:
        probs = probs.sum(1)  # (B, T, k)
    return out, probs


def _gathered_per_head(q, k, v, selected, return_probs, chunk_size, kernel, check_order, pattern):
    """The csr or copy kernel, probabilities per head (see `gathered_sparse_attention`)."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])  # (B, H, T, hd)
    if kernel == "csr" or (kernel == "auto" and csr_kernels_available(q)):
        if check_order and not rows_ascending(selected):
            if kernel == "auto":
                return gathered_by_copy(q, k, v, selected, return_probs, chunk_size)
            raise ValueError("the csr kernel needs each row's selected keys ascending with -1 slots last "
                             "(as select_keys returns them)")
        out, probs = csr_selected_attention(q, k, v, selected, pattern)
        return out, (probs if return_probs else None)
    return gathered_by_copy(q, k, v, selected, return_probs, chunk_size)


def gathered_by_copy(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    return_probs: bool = False,
    chunk_size: int = ATTENTION_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gathered path written plainly: copy the k selected key/value rows of each query.

    Queries go in chunks, and all heads at once since the selection is shared. Works on any
    device and dtype; memory-bound (it writes (B, Tc, k, H, hd) copies), hence the CSR kernel.
    Arguments and results as `gathered_sparse_attention`.
    """
    B, H, T, hd = q.shape
    k, v = expand_kv_heads(k, H), expand_kv_heads(v, H)  # (B, H, T, hd)
    keys = k.transpose(1, 2)  # (B, T, H, hd)
    values = v.transpose(1, 2)  # (B, T, H, hd)
    batch = torch.arange(B, device=q.device)[:, None, None]  # (B, 1, 1)
    outs, probs_chunks = [], []
    for start in range(0, T, chunk_size):
        sel = selected[:, start : start + chunk_size]  # (B, Tc, k)
        valid = sel >= 0
        index = sel.clamp(min=0)
        k_sel = keys[batch, index]  # (B, Tc, k, H, hd)
        v_sel = values[batch, index]  # (B, Tc, k, H, hd)
        q_c = q[:, :, start : start + chunk_size]  # (B, H, Tc, hd)
        scores = torch.einsum("bhtd,btjhd->bhtj", q_c, k_sel) / math.sqrt(hd)  # (B, H, Tc, k)
        probs = scores.masked_fill(~valid[:, None], float("-inf")).softmax(dim=-1)  # (B, H, Tc, k)
        outs.append(torch.einsum("bhtj,btjhd->bhtd", probs, v_sel))  # (B, H, Tc, hd)
        if return_probs:
            probs_chunks.append(probs)
    out = torch.cat(outs, dim=2)  # (B, H, T, hd)
    return out, (torch.cat(probs_chunks, dim=2) if return_probs else None)


class CausalSelfAttention(nn.Module):
    """Projections of one attention layer; the attending itself is done by the functions above."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        self.qkv_sizes = (config.d_model, kv_width, kv_width)
        self.qkv = nn.Linear(config.d_model, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values.

        Args:
            x: (B, T, d_model) normed input.
            cos, sin: (T, head_dim / 2).

        Returns:
            q: (B, H, T, hd); k, v: (B, HKV, T, hd).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)  # (B, T, H * hd), (B, T, HKV * hd) x 2
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k, v = (t.view(B, T, self.n_kv_heads, self.head_dim) for t in (k, v))  # (B, T, HKV, hd)
        # Rotated token-major, returned as (B, H, T, hd) views: the fused sparse kernel reads that
        # layout as it is (no copy of q and k per layer), SDPA and matmul read any strides.
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, hd/2): broadcast over heads
        return apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) head outputs -> (B, T, d_model) after the output projection."""
        B, H, T, hd = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))
