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
A `SelectionLayout` holds what both kernels share (the columns, and the key-major sort that
backward needs), so a layer sorts its selection once.
"""

from __future__ import annotations

import math
import warnings
import weakref

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


class SelectionLayout:
    """The head-independent part of a selection's CSR pattern, shared by every kernel that reads
    the same selection (the attention and the indexer's scores at the selected keys).

    Per batch element the pattern is (T, T+k): row t holds its k selected keys, an unfilled
    slot j pointing at spare column T + j. Its key-major order (the transposed pattern, needed by
    backward only) costs a sort of B*T*k entries: built once, on first use.

    Args:
        selected: (B, T, k) long, -1 = unfilled slot; each row ascending with the -1 slots last.
    """

    def __init__(self, selected: torch.Tensor) -> None:
        B, T, k = selected.shape
        self.batch, self.seq_len, self.k = B, T, k
        self.valid = selected >= 0  # (B, T, k)
        spare = T + torch.arange(k, device=selected.device)  # (k,)
        # Ascending within a row: valid indices come first (sorted), spare columns are >= T.
        cols = torch.where(self.valid, selected, spare).reshape(B, T * k)  # (B, T*k) row-major
        self.cols = cols.to(torch.int32) if T + k < 2**31 else cols
        self._key_major: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Weak: a pattern (held by the autograd nodes that use it) keeps its layout alive, not
        # the other way round, so both are freed as soon as the last backward has used them.
        self._patterns: weakref.WeakValueDictionary[int, SelectionPattern] = weakref.WeakValueDictionary()

    def pattern(self, n_heads: int) -> SelectionPattern:
        """The `SelectionPattern` for n_heads heads, built once: kernels with as many heads share it."""
        pattern = self._patterns.get(n_heads)
        if pattern is None:
            pattern = self._patterns[n_heads] = SelectionPattern(self, n_heads)
        return pattern

    def key_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows, per_key): entries sorted by key column, then query row.

        order: (B, T*k) entry indices in key-major order; rows: (B, T*k) their query rows;
        per_key: (B, T+k) entries in each key column.
        """
        if self._key_major is None:
            B, T, k = self.batch, self.seq_len, self.k
            # Entries are row-major, so a stable sort by column keeps each column's rows ascending.
            order = torch.sort(self.cols, dim=-1, stable=True).indices  # (B, T*k)
            rows = order // k  # (B, T*k) every row holds exactly k entries
            cols = self.cols.long()
            per_key = torch.zeros(B, T + k, dtype=torch.long, device=cols.device).scatter_add_(
                1, cols, torch.ones_like(cols)
            )  # (B, T+k)
            self._key_major = (order, rows, per_key)
        return self._key_major


class SelectionPattern:
    """The selection as one block-diagonal CSR pattern over every (batch, head) pair.

    Block (b, h) is the (T, T+k) pattern of batch element b (the selection is shared by the
    heads); stacking all B*H blocks on the diagonal turns each product into ONE sparse kernel
    call instead of B*H small ones (many small calls cost more than the work on a busy CPU).

    Args:
        layout: the selection's `SelectionLayout` (or the (B, T, k) selection, to build one).
        n_heads: H.
    """

    def __init__(self, layout: SelectionLayout | torch.Tensor, n_heads: int) -> None:
        if isinstance(layout, torch.Tensor):
            layout = SelectionLayout(layout)
        B, T, k = layout.batch, layout.seq_len, layout.k
        H, W = n_heads, T + k  # W: key columns per block, the T keys then k zero spares
        device = layout.cols.device
        self.layout = layout
        self.batch, self.heads, self.seq_len, self.k = B, H, T, k
        self.valid = layout.valid  # (B, T, k)
        block = torch.arange(B * H, device=device).view(B, H, 1)  # (B, H, 1) block number
        # int32 indices when they fit: the CPU kernels convert int64 ones on every call.
        self.index_dtype = torch.int32 if max(B * H * T * k, B * H * W) < 2**31 - 1 else torch.int64
        self.nnz = B * H * T * k
        self.crow = (torch.arange(B * H * T + 1, device=device) * k).to(self.index_dtype)  # (B*H*T+1,)
        self.shape = (B * H * T, B * H * W)

        self._transposed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, crow_t, rows_t) of the transposed pattern; built on first use (backward only).

        perm orders the entries key-major within each block (by column, then row): values[perm]
        are the transposed matrix's values, rows_t their column (query) indices.
        """
        if self._transposed is None:
            B, H, T, k = self.batch, self.heads, self.seq_len, self.k
            W, device, dtype = T + k, self.crow.device, self.index_dtype
            order, rows, per_key = self.layout.key_major()  # (B, T*k), (B, T*k), (B, W)
            block = torch.arange(B * H, device=device, dtype=dtype).view(B, H, 1)  # (B, H, 1)
            full_perm = (order[:, None, :].to(dtype) + block * (T * k)).reshape(-1)  # (B*H*T*k,)
            rows_t = (rows[:, None, :].to(dtype) + block * T).reshape(-1)  # (B*H*T*k,)
            per_key = per_key[:, None, :].expand(B, H, W).reshape(-1)  # (B*H*W,)
            crow_t = torch.cat((per_key.new_zeros(1), per_key.cumsum(0)))  # (B*H*W+1,)
            self._transposed = (full_perm, crow_t.to(dtype), rows_t)
        return self._transposed

    def columns(self) -> torch.Tensor:
        """(B*H*T*k,) column of every entry: block (b, h) offsets the layout's (B, T*k) columns.

        Built per call rather than kept: the pattern lives from forward to backward, and this
        array is H times the layout's.
        """
        B, H, W = self.batch, self.heads, self.seq_len + self.k
        block = torch.arange(B * H, device=self.crow.device, dtype=self.index_dtype).view(B, H, 1) * W  # (B, H, 1)
        return (self.layout.cols[:, None, :].to(self.index_dtype) + block).reshape(-1)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """(B*H*T, B*H*W) CSR with `values` (B, H, T, k) on the pattern."""
        return _csr(self.crow, self.columns(), values.reshape(-1), self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """(B*H*W, B*H*T) CSR transpose of `matrix(values)`."""
        perm, crow_t, rows_t = self.transposed()
        return _csr(crow_t, rows_t, values.reshape(-1).index_select(0, perm), self.shape[::-1])

    def sampled_products(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b^T) read at the pattern, block by block.

        Args:
            a: (B, H, T, hd).
            b: (B, H, W, hd).

        Returns:
            (B, H, T, k) values.
        """
        hd = a.shape[-1]
        pattern = self.matrix(a.new_zeros(self.nnz))
        product = torch.sparse.sampled_addmm(pattern, a.reshape(-1, hd), b.reshape(-1, hd).t(), beta=0.0)
        return product.values().view(self.batch, self.heads, self.seq_len, self.k)

    def times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Pattern matrix with `values` (B, H, T, k) times `dense` (B, H, W, hd) -> (B, H, T, hd)."""
        hd = dense.shape[-1]
        out = self.matrix(values) @ dense.reshape(-1, hd)  # (B*H*T, hd)
        return out.view(self.batch, self.heads, self.seq_len, hd)

    def transposed_times(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Transposed pattern matrix with `values` (B, H, T, k) times `dense` (B, H, T, hd) -> (B, H, W, hd)."""
        hd = dense.shape[-1]
        out = self.matrix_t(values) @ dense.reshape(-1, hd)  # (B*H*W, hd)
        return out.view(self.batch, self.heads, self.seq_len + self.k, hd)


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
        # Softmax backward on each row's k entries; masked slots have p = 0 and get 0.
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))  # (B, H, T, k)
        grad_q = pattern.times(grad_scores, k_pad) * ctx.scale  # (B, H, T, hd)
        grad_k = pattern.transposed_times(grad_scores, q_scaled)[:, :, :T]  # (B, H, T, hd)
        grad_v = pattern.transposed_times(probs, grad_out)[:, :, :T]  # (B, H, T, hd)
        ctx.pattern = None  # its index arrays are O(B*H*T*k): free them now, not with the graph
        return grad_q, grad_k, grad_v, None


class CsrSelectedIndexScores(torch.autograd.Function):
    """The Lightning Indexer's scores at the selected keys, on the selection pattern:

        I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])      for s in the selection of t

    with the logits q[t, j] . k[s] as sampled products (heads = the pattern's blocks). Saves only
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
        ctx.pattern = None  # free the O(B*H*T*k) index arrays now, not with the graph
        return grad_q, grad_k, grad_w, None


def csr_selected_index_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, selected: torch.Tensor, layout: SelectionLayout | None = None
) -> torch.Tensor:
    """I[t, s] at the selected keys with CSR kernels, differentiable in q, k and w.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`;
            CPU float32/float64.
        selected: (B, T, kk) long, -1 = unfilled (its score is 0); each row ascending with the
            -1 slots last (as `select_keys` returns it).
        layout: `SelectionLayout(selected)` when another kernel already built it (shares its sort).

    Returns:
        (B, T, kk): I[t, selected[t, j]].
    """
    B, T, H, d = q.shape
    pattern = (layout if layout is not None else SelectionLayout(selected)).pattern(H)
    keys = _pad_keys(k[:, None].expand(B, H, T, d), pattern.k)  # (B, H_I, T+kk, d_I), gradient sums over heads
    return CsrSelectedIndexScores.apply(q.transpose(1, 2).contiguous(), keys, w.transpose(1, 2).contiguous(), pattern)


def csr_selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, layout: SelectionLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the selected keys with CSR kernels.

    Args:
        q, k, v: (B, H, T, hd), CPU floating point. The CPU sparse kernels exist for float32 and
            float64 only: half-precision inputs are computed in float32 and the results cast back.
        selected: (B, T, k) long, -1 = unfilled slot; shared by all heads; each row ascending
            with the -1 slots last (as `select_keys` returns it).
        layout: `SelectionLayout(selected)` when another kernel already built it (shares its sort).

    Returns:
        out: (B, H, T, hd), dtype of q.
        probs: (B, H, T, k) in selection layout (0 on unfilled slots), no gradient.
    """
    dtype = q.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v = (x.to(compute).contiguous() for x in (q, k, v))
    out, probs = CsrSelectedAttention.apply(
        q, k, v, (layout if layout is not None else SelectionLayout(selected)).pattern(q.shape[1])
    )
    return out.to(dtype), probs.to(dtype)
