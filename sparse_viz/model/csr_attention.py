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

The same pattern serves the Lightning Indexer's scores at the selected keys (the sparse stage's
KL, `CsrSelectedIndexScores`; readable meaning: the full score matrix read at the selection).
One `SelectionPattern` serves both kernels and every head (the columns, and the key-major sort
that backward needs), so a layer sorts its selection once.
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
    """True where `sampled_addmm` and CSR @ dense are known to work: CPU floating point
    (float32/float64 natively; half precision runs them in float32, see `csr_selected_attention`)."""
    return x.device.type == "cpu" and x.is_floating_point()


class SelectionPattern:
    """The selection as one block-diagonal CSR pattern over the batch, shared by every head and by
    every kernel that reads the same selection (the attention and the indexer's scores at the
    selected keys).

    Block b is the (T, T+k) pattern of batch element b: row t holds its k selected keys (ascending),
    an unfilled slot j pointing at spare column T + j. The products run one head at a time over
    all batch blocks: H kernel calls, each on index arrays of the selection's own size, where
    one call over B*H head blocks needed H copies of them and H times larger temporaries (the
    peak memory at long T). The transposed pattern (key-major order; backward only) costs a sort
    of B*T*k entries: built once, on first use, for every kernel and head.

    Args:
        selected: (B, T, k) long, -1 = unfilled slot; each row ascending with the -1 slots last
            (as `select_keys` returns it).
    """

    def __init__(self, selected: torch.Tensor) -> None:
        B, T, k = selected.shape
        W, device = T + k, selected.device  # W: key columns per block, the T keys then k zero spares
        self.batch, self.seq_len, self.k = B, T, k
        self.valid = selected >= 0  # (B, T, k)
        # int32 indices when they fit: the CPU kernels convert int64 ones on every call.
        self.index_dtype = torch.int32 if max(B * T * k, B * W) < 2**31 - 1 else torch.int64
        spare = T + torch.arange(k, device=device)  # (k,)
        # Ascending within a row: valid indices come first (sorted), spare columns are >= T.
        local = torch.where(self.valid, selected, spare).reshape(B, T * k)  # (B, T*k) row-major
        self.local_cols = local.to(self.index_dtype)  # (B, T*k) column within the block
        block = torch.arange(B, device=device, dtype=self.index_dtype)[:, None]  # (B, 1)
        self.cols = (self.local_cols + block * W).reshape(-1)  # (B*T*k,)
        self.crow = (torch.arange(B * T + 1, device=device) * k).to(self.index_dtype)  # (B*T+1,)
        self.shape = (B * T, B * W)
        self._transposed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, crow_t, rows_t) of the transposed pattern; built on first use (backward only).

        perm orders the entries key-major within each block (by column, then row): values[perm]
        are the transposed matrix's values, rows_t their column (query) indices.
        """
        if self._transposed is None:
            B, T, k = self.batch, self.seq_len, self.k
            W, dtype = T + k, self.index_dtype
            # Entries are row-major, so a stable sort by column keeps each column's rows ascending.
            order = torch.sort(self.local_cols, dim=-1, stable=True).indices.to(dtype)  # (B, T*k)
            block = torch.arange(B, device=order.device, dtype=dtype)[:, None]  # (B, 1)
            perm = (order + block * (T * k)).reshape(-1)  # (B*T*k,)
            rows_t = (order // k + block * T).reshape(-1)  # (B*T*k,) every row holds exactly k entries
            cols = self.local_cols.long()
            per_key = torch.zeros(B, W, dtype=torch.long, device=cols.device).scatter_add_(
                1, cols, torch.ones_like(cols)
            ).reshape(-1)  # (B*W,) entries in each key column
            crow_t = torch.cat((per_key.new_zeros(1), per_key.cumsum(0)))  # (B*W+1,)
            self._transposed = (perm, crow_t.to(dtype), rows_t)
        return self._transposed

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """(B*T, B*W) CSR with `values` (B, T, k) of one head on the pattern."""
        return _csr(self.crow, self.cols, values.reshape(-1), self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """(B*W, B*T) CSR transpose of `matrix(values)`."""
        perm, crow_t, rows_t = self.transposed()
        return _csr(crow_t, rows_t, values.reshape(-1).index_select(0, perm), self.shape[::-1])

    def sampled_products(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b^T) read at the pattern, head by head.

        Args:
            a: (B, H, T, hd).
            b: (B, H, W, hd).

        Returns:
            (B, H, T, k) values.
        """
        B, H, T, hd = a.shape
        zeros = self.matrix(a.new_zeros(self.cols.shape[0]))  # the pattern; beta = 0 ignores its values
        out = a.new_empty(B, H, T, self.k)  # written head by head: no list of per-head results to stack
        for h in range(H):
            product = torch.sparse.sampled_addmm(zeros, a[:, h].reshape(B * T, hd), b[:, h].reshape(-1, hd).t(), beta=0.0)
            out[:, h] = product.values().view(B, T, self.k)
        return out

    def times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Pattern matrix with `values` (B, H, T, k) times `dense` (B, H, W, hd) -> (B, H, T, hd)."""
        B, H, T, _ = values.shape
        hd = dense.shape[-1]
        out = dense.new_empty(B, H, T, hd)
        for h in range(H):
            out[:, h] = (self.matrix(values[:, h]) @ dense[:, h].reshape(-1, hd)).view(B, T, hd)
        return out

    def transposed_times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Transposed pattern matrix with `values` (B, H, T, k) times `dense` (B, H, T, hd) -> (B, H, W, hd)."""
        B, H, T, _ = values.shape
        hd = dense.shape[-1]
        out = dense.new_empty(B, H, T + self.k, hd)
        for h in range(H):
            out[:, h] = (self.matrix_t(values[:, h]) @ dense[:, h].reshape(-1, hd)).view(B, T + self.k, hd)
        return out


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
        probs = scores.masked_fill_(~pattern.valid[:, None], -math.inf).softmax(dim=-1)  # (B, H, T, k) scores: a fresh tensor
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
        # Softmax backward on each row's k entries, in place; masked slots have p = 0 and get 0.
        row_dot = torch.einsum("bhtj,bhtj->bht", probs, grad_probs)[..., None]  # (B, H, T, 1)
        grad_scores = grad_probs.sub_(row_dot).mul_(probs)  # (B, H, T, k)
        grad_q = pattern.times(grad_scores, k_pad) * ctx.scale  # (B, H, T, hd)
        grad_k = pattern.transposed_times(grad_scores, q_scaled)[:, :, :T]  # (B, H, T, hd)
        grad_v = pattern.transposed_times(probs, grad_out)[:, :, :T]  # (B, H, T, hd)
        ctx.pattern = None  # its index arrays are O(B*T*k): free them now, not with the graph
        return grad_q, grad_k, grad_v, None


class CsrSelectedIndexScores(torch.autograd.Function):
    """The Lightning Indexer's scores at the selected keys, on the selection pattern:

        I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])      for s in the selection of t

    with the logits q[t, j] . k[s] as sampled products, one indexer head at a time. Saves only
    q, k and w: backward recomputes the (B, H_I, T, k) logits (one sampled product) instead of
    keeping them from forward to backward.
    """

    @staticmethod
    def forward(ctx, q, k_pad, w, pattern: SelectionPattern):
        # q: (B, H_I, T, d); k_pad: (B, H_I, T+k, d) the shared key per head; w: (B, H_I, T).
        relu = pattern.sampled_products(q, k_pad).relu_()  # (B, H_I, T, k)
        scores = (relu * w[..., None]).sum(1)  # (B, T, k)
        ctx.save_for_backward(q, k_pad, w)
        ctx.pattern = pattern
        return scores

    @staticmethod
    def backward(ctx, grad):
        q, k_pad, w = ctx.saved_tensors
        pattern: SelectionPattern = ctx.pattern
        grad = grad.contiguous()[:, None]  # (B, 1, T, k)
        relu = pattern.sampled_products(q, k_pad).relu_()  # (B, H_I, T, k) recomputed
        grad_w = (relu * grad).sum(-1)  # (B, H_I, T)
        grad_logits = (grad * w[..., None]).masked_fill_(relu == 0, 0.0)  # (B, H_I, T, k) ReLU'(0) = 0
        grad_q = pattern.times(grad_logits, k_pad)  # (B, H_I, T, d)
        grad_k = pattern.transposed_times(grad_logits, q)  # (B, H_I, T+k, d)
        ctx.pattern = None  # free the O(B*T*k) index arrays now, not with the graph
        return grad_q, grad_k, grad_w, None


def csr_selected_index_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, selected: torch.Tensor, pattern: SelectionPattern | None = None
) -> torch.Tensor:
    """I[t, s] at the selected keys with CSR kernels, differentiable in q, k and w.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`;
            CPU float32/float64.
        selected: (B, T, kk) long, -1 = unfilled (its score is 0); each row ascending with the
            -1 slots last (as `select_keys` returns it).
        pattern: `SelectionPattern(selected)` when another kernel already built it (shares its sort).

    Returns:
        (B, T, kk): I[t, selected[t, j]].
    """
    B, T, H, d = q.shape
    pattern = pattern if pattern is not None else SelectionPattern(selected)
    keys = _pad_keys(k[:, None].expand(B, H, T, d), pattern.k)  # (B, H_I, T+kk, d_I), gradient sums over heads
    return CsrSelectedIndexScores.apply(q.transpose(1, 2).contiguous(), keys, w.transpose(1, 2).contiguous(), pattern)


def csr_selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, pattern: SelectionPattern | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the selected keys with CSR kernels.

    Args:
        q, k, v: (B, H, T, hd), CPU floating point. The CPU sparse kernels exist for float32 and
            float64 only: half-precision inputs are computed in float32 and the results cast back.
        selected: (B, T, k) long, -1 = unfilled slot; shared by all heads; each row ascending
            with the -1 slots last (as `select_keys` returns it).
        pattern: `SelectionPattern(selected)` when another kernel already built it (shares its sort).

    Returns:
        out: (B, H, T, hd), dtype of q.
        probs: (B, H, T, k) in selection layout (0 on unfilled slots), no gradient.
    """
    dtype = q.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v = (x.to(compute).contiguous() for x in (q, k, v))
    out, probs = CsrSelectedAttention.apply(
        q, k, v, pattern if pattern is not None else SelectionPattern(selected)
    )
    return out.to(dtype), probs.to(dtype)
