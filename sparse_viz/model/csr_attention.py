"""Fast kernel of the gathered sparse attention: sparse CSR products over the selected pairs.

Gathering the k selected key/value rows of every query (a (T, k, H*hd) copy per tensor) is
memory-bound and slower on CPU than dense attention. Here the selection becomes the sparsity
pattern of a CSR matrix and PyTorch's sparse kernels read the selected rows in place:

    S = (q / sqrt(hd)) K^T  on the pattern        torch.sparse.sampled_addmm   O(T*k*hd)
    P = softmax over each row's k entries          dense (T, k) values
    O = P V                                        CSR @ dense                  O(T*k*hd)

and the backward pass uses the same products (with the transposed pattern). Every row holds
exactly k entries: an unfilled slot (-1) points at one of k extra all-zero key columns appended
after the T real ones, and its score is masked to -inf. Memory is O(T*k) per head.

The readable meaning is `masked_sparse_attention`; the explicit-gather version in
`attention.py` is the fallback where these kernels are not available.
"""

from __future__ import annotations

import math
import warnings

import torch



def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A CSR tensor built without invariant checks (valid by construction: sorted, in range).

    PyTorch flags CSR tensors as beta with a UserWarning; the ops used here are covered by the
    parity tests against the masked path, so the notice would only be noise in training logs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


def csr_kernels_available(x: torch.Tensor) -> bool:
    """True where `sampled_addmm` and CSR @ dense are known to work (CPU, float32/float64)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


class SelectionPattern:
    """The CSR pattern of one selection, shared by every head, and its transpose.

    Args:
        selected: (B, T, k) long, -1 = unfilled slot.
    """

    def __init__(self, selected: torch.Tensor) -> None:
        B, T, k = selected.shape
        device = selected.device
        self.batch, self.seq_len, self.k = B, T, k
        self.valid = selected >= 0  # (B, T, k)
        spare = T + torch.arange(k, device=device)  # (k,) columns of the zero padding keys
        # Ascending within a row: valid indices come first (sorted), spare columns are > T.
        self.cols = torch.where(self.valid, selected, spare).reshape(B, T * k)  # (B, T*k)
        self.crow = torch.arange(T + 1, device=device) * k  # (T+1,)
        rows = torch.arange(T, device=device).repeat_interleave(k)  # (T*k,)
        # Transposed pattern (key-major): sort the entries by (column, row).
        self.perm = torch.argsort(self.cols * T + rows, dim=-1)  # (B, T*k)
        self.rows_t = rows[self.perm]  # (B, T*k) row index of each entry in key-major order
        per_key = torch.zeros(B, T + k, dtype=torch.long, device=device).scatter_add_(
            1, self.cols, torch.ones_like(self.cols)
        )  # (B, T+k) entries in each key column
        self.crow_t = torch.cat((per_key.new_zeros(B, 1), per_key.cumsum(dim=1)), dim=1)  # (B, T+k+1)

    def matrix(self, b: int, values: torch.Tensor) -> torch.Tensor:
        """(T, T+k) CSR matrix of batch element b with the given (T*k,) values."""
        return _csr(self.crow, self.cols[b], values, (self.seq_len, self.seq_len + self.k))

    def matrix_t(self, b: int, values: torch.Tensor) -> torch.Tensor:
        """(T+k, T) CSR transpose of `matrix(b, values)`."""
        return _csr(self.crow_t[b], self.rows_t[b], values[self.perm[b]], (self.seq_len + self.k, self.seq_len))

    def sampled_products(self, a: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        """(a @ b_^T) read at the pattern.

        Args:
            a: (B, H, T, hd).
            b_: (B, H, T+k, hd).

        Returns:
            (B, H, T, k) values.
        """
        B, H, T, hd = a.shape
        out = []
        for b in range(B):
            pattern = _csr(self.crow.expand(H, -1), self.cols[b].expand(H, -1), a.new_zeros(H, T * self.k), (H, T, T + self.k))
            product = torch.sparse.sampled_addmm(pattern, a[b], b_[b].transpose(-1, -2), beta=0.0)
            out.append(product.values().view(H, T, self.k))
        return torch.stack(out)  # (B, H, T, k)

    def times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Pattern matrix with `values` (B, H, T, k) times `dense` (B, H, T+k, hd) -> (B, H, T, hd)."""
        B, H = values.shape[:2]
        flat = values.reshape(B, H, -1)
        return torch.stack([torch.stack([self.matrix(b, flat[b, h]) @ dense[b, h] for h in range(H)]) for b in range(B)])

    def transposed_times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Transposed pattern matrix with `values` (B, H, T, k) times `dense` (B, H, T, hd) -> (B, H, T+k, hd)."""
        B, H = values.shape[:2]
        flat = values.reshape(B, H, -1)
        return torch.stack([torch.stack([self.matrix_t(b, flat[b, h]) @ dense[b, h] for h in range(H)]) for b in range(B)])


def _pad_keys(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, T, hd) -> (B, H, T+k, hd) with k zero rows: the spare columns' keys/values."""
    return torch.cat((x, x.new_zeros(*x.shape[:2], k, x.shape[3])), dim=2)


class CsrSelectedAttention(torch.autograd.Function):
    """softmax over the selected keys, as sparse CSR products; forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, pattern: SelectionPattern):
        scale = q.shape[-1] ** -0.5
        q_scaled = q * scale  # (B, H, T, hd)
        k_pad, v_pad = _pad_keys(k, pattern.k), _pad_keys(v, pattern.k)  # (B, H, T+k, hd)
        scores = pattern.sampled_products(q_scaled, k_pad)  # (B, H, T, k)
        probs = scores.masked_fill(~pattern.valid[:, None], -math.inf).softmax(dim=-1)  # (B, H, T, k)
        out = pattern.times(probs, v_pad)  # (B, H, T, hd)
        ctx.save_for_backward(q_scaled, k_pad, v_pad, probs)
        ctx.pattern, ctx.scale = pattern, scale
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q_scaled, k_pad, v_pad, probs = ctx.saved_tensors
        pattern: SelectionPattern = ctx.pattern
        T = q_scaled.shape[2]
        grad_out = grad_out.contiguous()
        grad_probs = pattern.sampled_products(grad_out, v_pad)  # (B, H, T, k)
        # Softmax backward on each row's k entries; masked slots have p = 0 and get 0.
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))  # (B, H, T, k)
        grad_q = pattern.times(grad_scores, k_pad) * ctx.scale  # (B, H, T, hd)
        grad_k = pattern.transposed_times(grad_scores, q_scaled)[:, :, :T]  # (B, H, T, hd)
        grad_v = pattern.transposed_times(probs, grad_out)[:, :, :T]  # (B, H, T, hd)
        return grad_q, grad_k, grad_v, None


def csr_selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the selected keys with CSR kernels.

    Args:
        q, k, v: (B, H, T, hd), CPU float32/float64.
        selected: (B, T, k) long, -1 = unfilled slot; shared by all heads.

    Returns:
        out: (B, H, T, hd).
        probs: (B, H, T, k) in selection layout (0 on unfilled slots), no gradient.
    """
    return CsrSelectedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), SelectionPattern(selected))
