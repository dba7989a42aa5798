"""Fused CPU kernels of the sparse stage (C++ in `fused_cpu/`), built on first use.

Three kernels, each with a readable meaning elsewhere that the tests hold it to:

- `fused_selected_attention`: softmax attention over each query's selected keys, forward and
  backward, keeping one log-sum-exp per (head, query) for backward instead of (B, H, T, k)
  probabilities (meaning: `attention.masked_sparse_attention`).
- `fused_selected_index_scores`: the Lightning Indexer's scores at the selected keys, with
  gradient (meaning: the full score matrix read at the selection).
- `fused_selected_index_kl`: the sparse stage's indexer loss on those scores, KL(p || softmax(I))
  per row, neither the scores nor the loss's intermediates stored (meaning: `indexer.indexer_kl`).
- `fused_index_topk`: the indexer's causal top-k, each query's score row computed and ranked in
  a row-sized buffer, never stored (meaning: `topk_causal` of `LightningIndexer.forward`, the
  earliest keys kept among ties at the k-th score).

Why fused: the same computations as torch ops (or sparse CSR products) write O(T * k * H)
(attention) or O(T^2 * H_I) (indexer) intermediates to memory and read them back; here a query
row's scores live in a row-sized buffer. One source file per kernel (`sparse_attention.cpp`,
`index_scores.cpp`, `index_topk.cpp`), their shared vector routines in `vector_ops.h`.

The C++ sources are compiled once per machine by `torch.utils.cpp_extension` (g++ and ninja; the
result is cached under ~/.cache/torch_extensions) the first time a kernel is asked for;
`scripts/setup.sh` builds it ahead. Where it cannot be built, `fused_kernels_available` is False,
one warning names the reason, and the model uses the CSR kernels (`csr_attention.py`) instead.
float32 and float64 on CPU; the sparse attention, and the top-k's q and k, also read bfloat16 as
stored (computing in float32); other dtypes are computed in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).with_name("fused_cpu")
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))  # compiled and linked into one library
HEADERS = sorted(SOURCE_DIR.glob("*.h"))
DISABLE_ENV = "SPARSE_VIZ_FUSED_KERNELS"  # "0" = never build or use them (the CSR kernels instead)

# Extra compiler flags, e.g. "-mno-avx512f": a build for less than this CPU has, to test or time
# another CPU's code path here (bench/README.md's AVX2 rows). Part of the build's name.
EXTRA_FLAGS_ENV = "SPARSE_VIZ_FUSED_CFLAGS"
# OpenMP: at::parallel_for runs serially without it. -march=native: the build is per machine, so
# the compiler may use every instruction this CPU has.
BUILD_FLAGS = (["-O3", "-fopenmp"] + (["-march=native"] if os.uname().machine == "x86_64" else [])
               + shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")))
_ops = None  # torch.ops.sparse_viz_fused once loaded
_failure: str | None = None  # why they could not be built, once tried


def _cpu_identity() -> str:
    """The CPU's model and feature flags: a -march=native build from one CPU must not be loaded on
    another (a home directory, and so the build cache, can be shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = ("model name", "flags", "Features", "CPU part")
    return "|".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def _build_name(flags: list[str]) -> str:
    """Extension name tied to the source, the flags and the CPU, so an edited source (or another
    machine) gets its own build instead of a stale one."""
    key = b"".join(path.name.encode() + path.read_bytes() for path in SOURCES + HEADERS)
    key += " ".join(flags).encode() + _cpu_identity().encode()
    return f"sparse_viz_fused_{hashlib.sha256(key).hexdigest()[:12]}"


def load_fused_kernels(verbose: bool = False):
    """The compiled operators (`torch.ops.sparse_viz_fused`), building them if needed; None where
    they cannot be built (the reason is warned once) or are disabled by SPARSE_VIZ_FUSED_KERNELS=0."""
    global _ops, _failure
    if _ops is not None:
        return _ops
    if os.environ.get(DISABLE_ENV, "1") == "0" or _failure is not None:
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=_build_name(BUILD_FLAGS), sources=[str(path) for path in SOURCES], extra_cflags=BUILD_FLAGS, extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=verbose
        )
        _ops = torch.ops.sparse_viz_fused
    except Exception as error:  # noqa: BLE001 - any build failure means: use the CSR kernels
        _failure = _failure_reason(error)
        warnings.warn(
            f"sparse_viz: fused CPU kernels could not be built ({_failure}); using the CSR kernels",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _ops


def _failure_reason(error: Exception) -> str:
    """One line saying why a build failed: the compiler's first error (or a missing program)
    rather than the build tool's closing "build stopped"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines[1:] if re.search(r"error:|not found|No such file", line)]
    return f"{type(error).__name__}: {(telling or lines[-1:] or [''])[0][:300]}"


@contextlib.contextmanager
def fused_kernels_disabled():
    """Within the block, every "auto" choice takes the kernels before these (torch ops, CSR):
    for side-by-side measurements and checks in one process."""
    global _ops
    saved, before = _ops, os.environ.get(DISABLE_ENV)
    _ops = None
    os.environ[DISABLE_ENV] = "0"
    try:
        yield
    finally:
        _ops = saved
        if before is None:
            del os.environ[DISABLE_ENV]
        else:
            os.environ[DISABLE_ENV] = before


def unavailable_reason() -> str | None:
    """Why the kernels are not used ("SPARSE_VIZ_FUSED_KERNELS=0", or the build's failure), or
    None when they are loaded or not yet tried."""
    return f"{DISABLE_ENV}=0" if os.environ.get(DISABLE_ENV, "1") == "0" else _failure


def _kernels():
    """The operators, or one clear error where they cannot be had."""
    ops = load_fused_kernels()
    if ops is None:
        reason = unavailable_reason()
        raise RuntimeError(f"the fused CPU kernels are not available ({reason}); use kernel='csr' or 'copy'")
    return ops


def _check_cpu(*tensors: torch.Tensor) -> None:
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the fused kernels run on CPU tensors only; use kernel='copy' on other devices")


def fused_kernels_available(x: torch.Tensor) -> bool:
    """True for CPU floating-point tensors when the kernels are (or can be) built."""
    return x.device.type == "cpu" and x.is_floating_point() and load_fused_kernels() is not None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _indexer_compute_dtype(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype the indexer kernels compute (q, k, w) in: their common dtype, half precision as float32."""
    return _compute_dtype(torch.promote_types(torch.promote_types(q.dtype, k.dtype), w.dtype))


class FusedSelectedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hd)) over the selected keys times v; saves the log-sum-exp only.

    q and the output token-major (B, T, H, hd), k and v (B, T, HKV, hd); contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, selected, per_head_probs: bool):
        scale = q.shape[-1] ** -0.5
        out, lse, probs = _kernels().sparse_attention_forward(q, k, v, selected, scale, per_head_probs)
        ctx.save_for_backward(q, k, v, out, lse, selected)
        ctx.scale = scale
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):
        q, k, v, out, lse, selected = ctx.saved_tensors
        grad_q, grad_k, grad_v = _kernels().sparse_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, selected, ctx.scale
        )
        return grad_q, grad_k, grad_v, None, None


def fused_selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, per_head_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over the selected keys with the fused kernel.

    Args:
        q: (B, H, T, hd), CPU floating point. bfloat16 q, k and v are read as stored and computed
            in float32 (softmax and every sum; the gradients rounded once); float16 and mixed
            dtypes are converted to float32 first.
        k, v: (B, HKV, T, hd), HKV dividing H: query head h reads key/value head h // (H / HKV),
            and each gathered key/value row serves its whole group of query heads.
        selected: (B, T, k) long or int32 (kept for backward: int32 is half the memory), causal,
            -1 = unfilled slot; shared by all heads; any order.
        per_head_probs: return the probabilities of every head, else their sum over heads.

    Returns:
        out: (B, H, T, hd), dtype of q; differentiable in q, k and v (the gradients of k and v
            summed over each group's query heads).
        probs: (B, H, T, k) if per_head_probs else (B, T, k) summed over heads, in selection
            layout (0 on unfilled slots); no gradient.
    """
    _check_cpu(q, k, v, selected)
    dtype = q.dtype
    stored = dtype if q.dtype == k.dtype == v.dtype == torch.bfloat16 else _compute_dtype(dtype)
    # Token-major (B, T, H, hd): a selected key's rows of every head are one block in memory.
    q, k, v = (x.to(stored).transpose(1, 2).contiguous() for x in (q, k, v))
    out, probs = FusedSelectedAttention.apply(q, k, v, selected.contiguous(), per_head_probs)
    return out.transpose(1, 2).to(dtype), probs.to(dtype)


class FusedSelectedIndexScores(torch.autograd.Function):
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) at the selected keys; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, q, k, w, selected):
        ctx.save_for_backward(q, k, w, selected)
        return _kernels().selected_index_scores_forward(q, k, w, selected)

    @staticmethod
    def backward(ctx, grad):
        q, k, w, selected = ctx.saved_tensors
        grad_q, grad_k, grad_w = _kernels().selected_index_scores_backward(grad.contiguous(), q, k, w, selected)
        return grad_q, grad_k, grad_w, None


def fused_selected_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The indexer's scores at the selected keys with the fused kernel, differentiable in q, k and w.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
        selected: (B, T, kk) long or int32, causal, -1 = unfilled (its score is 0); any order.

    Returns:
        (B, T, kk) in q's dtype.
    """
    _check_cpu(q, k, w, selected)
    dtype = q.dtype
    compute = _indexer_compute_dtype(q, k, w)
    q, k, w = (x.to(compute).contiguous() for x in (q, k, w))
    return FusedSelectedIndexScores.apply(q, k, w, selected.contiguous()).to(dtype)


class FusedSelectedIndexKL(torch.autograd.Function):
    """KL(p || softmax(I)) per row over the selected keys; backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, w, selected, target):
        # The target is kept as given (bfloat16 under autocast: half a float32 copy's memory) and
        # converted to the kernels' dtype where each reads it.
        kl, lse = _kernels().selected_index_kl_forward(q, k, w, selected, target.to(q.dtype).contiguous())
        ctx.save_for_backward(q, k, w, selected, target, lse)
        return kl

    @staticmethod
    def backward(ctx, grad):
        q, k, w, selected, target, lse = ctx.saved_tensors
        grad_q, grad_k, grad_w = _kernels().selected_index_kl_backward(
            grad.contiguous(), q, k, w, selected, target.to(q.dtype).contiguous(), lse
        )
        return grad_q, grad_k, grad_w, None, None


def fused_selected_index_kl(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, selected: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The sparse stage's indexer loss with the fused kernel: `indexer_kl(target, I, selected >= 0)`
    for the indexer's scores I at the selected keys, differentiable in q, k and w.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
        selected: (B, T, kk) long or int32, causal, -1 = unfilled; any order.
        target: (B, T, kk) non-negative weights at the selected keys (the main attention summed
            over heads); no gradient flows into it.

    Returns:
        (B, T) KL per query row, float32 (float64 for float64 inputs); 0 for a row with no valid
        key or no target mass.
    """
    _check_cpu(q, k, w, selected, target)
    compute = _indexer_compute_dtype(q, k, w)
    q, k, w = (x.to(compute).contiguous() for x in (q, k, w))
    return FusedSelectedIndexKL.apply(q, k, w, selected.contiguous(), target.detach())


@torch.no_grad()
def fused_index_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int) -> torch.Tensor:
    """`topk_causal` of the Lightning Indexer's scores, the score matrix never stored.

    Args:
        q: (B, T, H_I, d_I), k: (B, T, d_I), w: (B, T, H_I) from `LightningIndexer.project`.
            q and k both bfloat16: read as stored, each product exact in float32 and summed there
            (AVX512-BF16's vdpbf16ps where the CPU has it, else widened first: the same products),
            w in float32. Otherwise computed in their common dtype, half precision as float32.
        top_k: keys per query (>= 1).

    Returns:
        (B, T, min(top_k, T)) long in `select_keys` order: rows t + 1 <= top_k hold 0..t then -1;
        other rows their top_k keys ascending (the earliest among ties at the k-th score).
    """
    _check_cpu(q, k, w)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if q.dtype == k.dtype == torch.bfloat16:
        q, k, w = q.detach().contiguous(), k.detach().contiguous(), w.detach().float().contiguous()
    else:
        compute = _indexer_compute_dtype(q, k, w)
        q, k, w = (x.detach().to(compute).contiguous() for x in (q, k, w))
    return _kernels().causal_index_topk(q, k, w, top_k)


def main() -> int:
    """Build the kernels now and say so (scripts/setup.sh runs it); 1 where they cannot be built."""
    ops = load_fused_kernels()
    if ops is None:
        print(f"fused CPU kernels: not built ({_failure or DISABLE_ENV + '=0'})", file=sys.stderr)
        return 1
    print(f"fused CPU kernels: built ({_build_name(BUILD_FLAGS)})")
    return 0
