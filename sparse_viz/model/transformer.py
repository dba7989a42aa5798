"""Decoder-only transformer with DeepSeek Sparse Attention (pre-norm, RMSNorm, RoPE, SwiGLU).

Each layer: h += attn(norm(h)); h += mlp(norm(h)), where norm(h) may pass through a causal short
convolution first (`config.short_conv`, off by default). The attention of a layer is dense or
restricted to the keys chosen by `config.selector` (the Lightning Indexer's top-k, or a
baseline); the indexer reads the same normed input, detached, and learns only from its KL loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention import (
    CausalSelfAttention,
    causal_attention_probs,
    dense_causal_attention,
    expand_kv_heads,
    gather_selected,
    gathered_sparse_attention,
    masked_sparse_attention,
    scatter_selected,
)
from .config import ModelConfig
from .csr_attention import SelectionPattern, csr_kernels_available
from .fused_kernels import fused_kernels_available
from .indexer import LightningIndexer, indexer_kl
from .indexer_blocks import blockwise_causal_kl, blockwise_topk, selected_index_kl
from .layers import RMSNorm, SwiGLU
from .rope import RotaryEmbedding
from .selectors import select_keys
from .short_conv import CausalShortConv
from .trace import AttentionTrace

ATTENTION_MODES = ("sparse", "dense")
INDEXER_LOSSES = (None, "all", "selected")
TRACE_LEVELS = (False, "select", "full")


@dataclass
class TransformerOutput:
    """What `SparseTransformer.forward` returns.

    Attributes:
        logits: (B, T, V).
        indexer_kl: (n_layers,) per layer, the mean over the B*T query rows of
            KL(p_t || softmax(I_t)); None unless `indexer_loss` was asked for.
        traces: one `AttentionTrace` per layer, or None unless `trace` was asked for.
    """

    logits: torch.Tensor
    indexer_kl: torch.Tensor | None = None
    traces: list[AttentionTrace] | None = None


@dataclass
class LayerResult:
    """One block's output plus what the model collects from it."""

    hidden: torch.Tensor
    kl: torch.Tensor | None
    trace: AttentionTrace | None


class Block(nn.Module):
    """One pre-norm decoder layer with (optionally) its Lightning Indexer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.short_conv = CausalShortConv(config.d_model, config.short_conv) if config.short_conv else None
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        self.indexer = LightningIndexer(config) if config.use_indexer else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        indexer_rope: tuple[torch.Tensor, torch.Tensor],
        attention: str,
        indexer_loss: str | None,
        trace: str | bool,
    ) -> LayerResult:
        """Args: x (B, T, d_model); rope tables (T, hd/2) and (T, indexer_rope_dim/2).
        Returns: a `LayerResult` with hidden (B, T, d_model)."""
        cfg = self.config
        B, T, _ = x.shape
        h = self.attn_norm(x)
        if self.short_conv is not None:
            h = self.short_conv(h)  # attention and the indexer read the filtered input
        q, k, v = self.attn.project(h, *rope)  # q (B, H, T, hd); k, v (B, HKV, T, hd)

        selector = "dense" if attention == "dense" else cfg.selector
        run_indexer = self.indexer is not None and (selector == "topk" or indexer_loss is not None or bool(trace))
        # A trace records the full (B, T, T) scores: traced forwards (the probe) take the full path.
        blockwise = run_indexer and cfg.indexer_path == "blockwise" and not trace
        index_scores, head_terms, projected = None, None, None
        if blockwise:
            projected = self.indexer.project(h, *indexer_rope)  # q_I (B, T, H_I, d_I), k_I (B, T, d_I), w (B, T, H_I)
        elif run_indexer:
            index_scores, head_terms = self.indexer(h, *indexer_rope, return_head_terms=trace == "full")  # (B, T, T)

        # With a dense selection, "selected" is every causal key: the same loss as "all".
        if selector == "dense" and indexer_loss == "selected":
            indexer_loss = "all"

        # Dense probabilities only when something reads them: the oracle, the full path's warm-up
        # KL target, a full trace. They carry gradient only when they are the attention itself.
        need_dense_probs = selector == "oracle" or (indexer_loss == "all" and not blockwise) or trace == "full"
        dense_probs = None
        if need_dense_probs:
            with torch.set_grad_enabled(torch.is_grad_enabled() and selector == "dense"):
                dense_probs = causal_attention_probs(q, k)  # (B, H, T, T)

        if selector == "topk" and blockwise:
            selected = blockwise_topk(*projected, cfg.top_k, cfg.indexer_block_size)  # (B, T, k)
        else:
            selected = select_keys(
                selector,
                top_k=cfg.top_k,
                seq_len=T,
                index_scores=index_scores,
                dense_probs=dense_probs,
                sink_tokens=cfg.sink_tokens,
                seed=cfg.selector_seed,
                batch_size=B,
                device=x.device,
            )  # (B, T, k) or None

        pattern = None
        used_probs = None  # (B, H, T, T) probabilities actually used, when a trace wants them
        selected_probs = None  # (B, T, k) the same on the selection summed over heads, for the sparse-stage KL
        need_sparse_probs = indexer_loss == "selected" or trace == "full"
        kernel_selected = selected  # what the attention and the indexer's loss read
        if selected is None:
            if dense_probs is not None:
                y = dense_probs @ v  # (B, H, T, hd)
                used_probs = dense_probs
            else:
                y = dense_causal_attention(q, k, v)  # (B, H, T, hd)
        elif cfg.attention_path == "masked":
            y, used_probs = masked_sparse_attention(q, k, v, selected, return_probs=need_sparse_probs)
            if indexer_loss == "selected":
                selected_probs = gather_selected(used_probs, selected).sum(1)  # (B, T, k)
        else:
            # One CSR pattern of the selection for the attention and the indexer's selected-key
            # scores, where the CSR kernels are the ones used (the fused kernels need none).
            fused = fused_kernels_available(q)
            use_csr = csr_kernels_available(q) and not fused
            pattern = SelectionPattern(selected) if use_csr else None
            # The fused kernels read int32 selections: one copy, shared by the attention and the
            # indexer's loss and kept for their backward, at half the int64 selection's memory.
            kernel_selected = selected.to(torch.int32) if fused else selected
            y, selected_probs = gathered_sparse_attention(
                q, k, v, kernel_selected, return_probs=need_sparse_probs, check_order=False, pattern=pattern,
                sum_heads=trace != "full",
            )  # select_keys returns rows in the order the csr kernel needs
            if trace == "full":
                used_probs = scatter_selected(selected_probs, selected, T)
                selected_probs = selected_probs.sum(1)  # (B, T, k) summed over heads
        x = x + self.attn.merge_heads(y)
        x = x + self.mlp(self.mlp_norm(x))

        kl = None
        if indexer_loss == "all" and blockwise:
            kl = blockwise_causal_kl(*projected, q, expand_kv_heads(k, cfg.n_heads), cfg.indexer_block_size).mean()
        elif indexer_loss == "all":
            target = dense_probs.detach().sum(1)  # (B, T, T), L1-normalised inside indexer_kl
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            kl = indexer_kl(target, index_scores, causal).mean()
        elif indexer_loss == "selected":
            # The target is the sparse attention actually used, read at the selected keys: (B, H, T, k)
            # from the gathered path directly; the masked (reference) path gathers it from (B, H, T, T).
            target = selected_probs.detach()  # (B, T, k)
            if blockwise:  # scores at the selected keys only: T*k*H_I*d_I work
                kl = selected_index_kl(*projected, kernel_selected, target, pattern=pattern).mean()
            else:
                scores = gather_selected(index_scores, selected)  # (B, T, k) read from (B, T, T)
                kl = indexer_kl(target, scores, selected >= 0).mean()

        layer_trace = None
        if trace:
            full = trace == "full"
            layer_trace = AttentionTrace(
                selected=selected,
                index_scores=None if index_scores is None else index_scores.detach(),
                index_head_terms=head_terms.detach() if full and head_terms is not None else None,
                attn_probs=used_probs.detach() if full else None,
                dense_attn_probs=dense_probs.detach() if full else None,
            )
        return LayerResult(x, kl, layer_trace)


class SparseTransformer(nn.Module):
    """Decoder-only language model whose attention may be sparse (DSA or a baseline selector)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.indexer_rope = RotaryEmbedding(config.indexer_rope_dim, config.max_seq_len, config.rope_theta)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the stream's variance stays put.
        for name, param in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def indexer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the Lightning Indexers (trained by the KL loss only)."""
        return [p for name, p in self.named_parameters() if ".indexer." in name]

    def main_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (trained by the LM loss)."""
        return [p for name, p in self.named_parameters() if ".indexer." not in name]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention: str = "sparse",
        indexer_loss: str | None = None,
        trace: str | bool = False,
    ) -> TransformerOutput:
        """Run the model.

        Args:
            input_ids: (B, T) long, T <= config.max_seq_len.
            attention: "sparse" uses `config.selector`; "dense" forces dense causal attention.
            indexer_loss: None; "all" = KL over all causal keys, target = dense attention
                (dense / warm-up stages); "selected" = KL over each query's selected set,
                target = the sparse attention actually used (sparse stage).
            trace: False; "select" = selected keys and index scores per layer; "full" = also
                index head terms, used and dense attention probabilities.

        Returns:
            `TransformerOutput` with logits (B, T, V).
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if indexer_loss not in INDEXER_LOSSES:
            raise ValueError(f"indexer_loss must be one of {INDEXER_LOSSES}, got {indexer_loss!r}")
        if trace not in TRACE_LEVELS:
            raise ValueError(f"trace must be one of {TRACE_LEVELS}, got {trace!r}")
        if indexer_loss is not None and not cfg.use_indexer:
            raise ValueError("indexer_loss needs the Lightning Indexer (config.use_indexer=True)")

        x = self.embed(input_ids)  # (B, T, d_model)
        rope, indexer_rope = self.rope(T), self.indexer_rope(T)
        kls, traces = [], []
        for block in self.blocks:
            result = block(x, rope, indexer_rope, attention, indexer_loss, trace)
            x = result.hidden
            kls.append(result.kl)
            traces.append(result.trace)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        return TransformerOutput(
            logits=logits,
            indexer_kl=torch.stack(kls) if indexer_loss is not None else None,
            traces=traces if trace else None,
        )
