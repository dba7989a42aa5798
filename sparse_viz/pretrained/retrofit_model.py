"""A pretrained Hugging Face causal LM with retrofitted Lightning Indexers: DSA on a real model.

`RetrofitModel` wraps the unmodified model and one indexer per layer (`retrofit_indexers.py`)
and runs it the way `SparseTransformer` runs (same `forward` arguments, same `TransformerOutput`),
so the training module, the stage schedule and the `SelectionAnalysisCallback` work on it as they
work on the small model:

- `attention="dense"`: the model's own attention (transformers' SDPA function);
  `indexer_loss="all"` adds each layer's warm-up KL(p || softmax(I)) over all causal keys, p =
  the layer's attention probabilities summed over all query heads (GQA included) and
  L1-normalised, computed by query blocks (`blockwise_causal_kl`; `warmup_kl` chooses how): no
  (B, H, T, T) tensor outlives its layer, and no gradient reaches the model.
- `attention="sparse"`: every head of a layer attends to the same top-k keys of the layer's
  indexer (causal; rows with t + 1 <= k dense); `indexer_loss="selected"` adds the KL on the
  selected set against the sparse attention actually used, from a detached input.

It plugs in through transformers' attention-function registry (`AttentionInterface`) and a
forward pre-hook on each attention module for the normed input; no modeling code is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.model.attention import (
    causal_attention_probs,
    expand_kv_heads,
    gathered_sparse_attention,
    scatter_selected,
)
from sparse_viz.model.csr_attention import SelectionPattern, csr_kernels_available
from sparse_viz.model.fused_kernels import fused_kernels_available
from sparse_viz.model.indexer import indexer_kl
from sparse_viz.model.indexer_blocks import blockwise_causal_kl, blockwise_topk, selected_index_kl
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.trace import AttentionTrace
from sparse_viz.model.transformer import TransformerOutput
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers

RETROFIT_ATTENTION = "sparse_viz_retrofit"
ATTENTIONS = ("dense", "sparse")
INDEXER_LOSSES = (None, "all", "selected")
WARMUP_KL_PATHS = ("full", "blocks", "checkpointed")


@dataclass
class RetrofitPass:
    """What one `RetrofitModel.forward` asks of every layer, and what the layers leave in it."""

    attention: str
    indexer_loss: str | None
    trace: bool
    top_k: int
    block_size: int
    indexer_rope: tuple[torch.Tensor, torch.Tensor]
    normed: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, D) attention input
    kl: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> () mean KL over query rows
    traces: dict[int, AttentionTrace] = field(default_factory=dict)


class RetrofitModel(nn.Module):
    """A frozen (or fine-tuned) Hugging Face causal LM plus one Lightning Indexer per layer.

    Args:
        model: the Hugging Face model (Qwen3, Qwen2, Llama, Mistral; Qwen3-VL's language model),
            full causal attention in every layer.
        indexers: `RetrofitIndexers` sized for it.
        top_k: keys per query in the sparse attention.
        block_size: queries per block of the indexer's top-k (and of the blockwise warm-up KL).
        warmup_kl: how the warm-up KL is computed. "full": from each layer's (B, H, T, T)
            attention probabilities, which then also give the attention output (eager
            attention). "blocks": by query blocks beside the model's SDPA, each block's target
            computed once over the keys up to its last query (about half the pairs), its graph
            kept for backward. "checkpointed": the same blocks, recomputed in backward (one
            block's (B, block, H_I, T) logits alive at a time; for long T)."
    """

    def __init__(self, model: nn.Module, indexers: RetrofitIndexers, top_k: int = 64, block_size: int = 256,
                 warmup_kl: str = "blocks") -> None:
        super().__init__()
        if top_k < 1:
            raise UserInputError(f"k must be >= 1, got {top_k}")
        self.hf = model
        self.indexers = indexers
        self.adapter = ArchitectureAdapter.for_model(model)
        self.top_k = int(top_k)
        self.block_size = int(block_size)
        if warmup_kl not in WARMUP_KL_PATHS:
            raise UserInputError(f"warmup_kl must be one of {', '.join(WARMUP_KL_PATHS)}, got {warmup_kl!r}")
        self.warmup_kl = warmup_kl
        windows = [i for i in range(self.adapter.n_layers) if self.adapter.sliding_window(i)]
        if windows:
            raise UserInputError(f"retrofit indexers need full causal attention; layers {windows} use a sliding window")
        if len(indexers) != self.adapter.n_layers or indexers.settings["hidden_size"] != self.adapter.hidden_size:
            raise UserInputError(f"{len(indexers)} indexers of width {indexers.settings['hidden_size']} for a model "
                                 f"with {self.adapter.n_layers} layers of width {self.adapter.hidden_size}")
        register_retrofit_attention()
        self._pass: RetrofitPass | None = None
        for i in range(self.adapter.n_layers):
            attention = self.adapter.attention(i)
            attention.register_forward_pre_hook(self._remember_normed_input(i), with_kwargs=True)
            # Plain attribute, not a submodule: the attention module must not own the wrapper.
            object.__setattr__(attention, "_sparse_viz_retrofit", self)
        model.set_attn_implementation(RETROFIT_ATTENTION)

    def _remember_normed_input(self, layer: int):
        def hook(module, args, kwargs):
            if self._pass is not None:
                self._pass.normed[layer] = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        return hook

    def main_parameters(self) -> list[nn.Parameter]:
        """The pretrained model's parameters (frozen unless the sparse stage fine-tunes them)."""
        return list(self.hf.parameters())

    def indexer_parameters(self) -> list[nn.Parameter]:
        return list(self.indexers.parameters())

    def forward(self, input_ids: torch.Tensor, attention: str = "sparse", indexer_loss: str | None = None,
                trace: str | bool = False) -> TransformerOutput:
        """Run the model with its own (`dense`) or the indexers' top-k (`sparse`) attention.

        Args:
            input_ids: (B, T) token ids, unpadded.
            attention: "dense" or "sparse".
            indexer_loss: None, "all" (warm-up KL over all causal keys) or "selected" (KL over
                the selected keys; sparse attention).
            trace: "full" (or True) to record every layer's `AttentionTrace` with full
                probabilities and index scores (the probe; memory O(L * H * T^2)).

        Returns:
            `TransformerOutput`: logits (B, T, V); indexer_kl (n_layers,) or None; traces.
        """
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if indexer_loss not in INDEXER_LOSSES:
            raise ValueError(f"indexer_loss must be one of {INDEXER_LOSSES}, got {indexer_loss!r}")
        T = input_ids.shape[1]
        settings = self.indexers.settings
        cos, sin = rope_tables(settings["rope_dim"], T, settings["rope_theta"])
        self._pass = RetrofitPass(attention, indexer_loss, bool(trace), self.top_k, self.block_size,
                                  (cos.to(input_ids.device), sin.to(input_ids.device)))
        try:
            logits = self.hf(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            done = self._pass
        finally:
            self._pass = None
        n_layers = self.adapter.n_layers
        kl = torch.stack([done.kl[i] for i in range(n_layers)]) if indexer_loss is not None else None
        traces = [done.traces[i] for i in range(n_layers)] if trace else None
        return TransformerOutput(logits=logits, indexer_kl=kl, traces=traces)


def retrofit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """One layer's attention under the current `RetrofitPass` (registered as RETROFIT_ATTENTION).

    Args:
        query: (B, H, T, hd); key, value: (B, Hkv, T, hd), post-RoPE (and post q/k-norm).
        attention_mask: what transformers' SDPA mask function built (None when plain causal).

    Returns:
        (attn_output (B, T, H, hd), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    owner: RetrofitModel | None = getattr(module, "_sparse_viz_retrofit", None)
    run = owner._pass if owner is not None else None
    if run is None:  # called outside RetrofitModel.forward: the model's own attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        raise UserInputError("retrofit attention needs unpadded causal sequences (got an attention mask)")
    layer = module.layer_idx
    B, H, T, hd = query.shape
    # The project's kernels scale scores by hd**-0.5; folding the model's own `scaling` into the
    # queries makes them compute this model's softmax exactly.
    q = query * (scaling * math.sqrt(hd))  # (B, H, T, hd)
    indexer = owner.indexers[layer]
    normed = run.normed.pop(layer)  # (B, T, D)
    full_target = run.indexer_loss == "all" and owner.warmup_kl == "full"
    projected = None  # (B, T, H_I, d_I), (B, T, d_I), (B, T, H_I) where the blockwise kernels need them
    if run.attention == "sparse" or (run.indexer_loss == "all" and not full_target):
        projected = indexer.project(normed, *run.indexer_rope)

    selected = None
    if run.attention == "sparse":
        selected = blockwise_topk(*projected, run.top_k, run.block_size)  # (B, T, k)
    dense_probs = None
    if run.trace or full_target:
        with torch.set_grad_enabled(torch.is_grad_enabled() and run.attention == "dense"):
            dense_probs = causal_attention_probs(q, key)  # (B, H, T, T); query head h reads KV head h // (H / HKV)
    if selected is None:
        if dense_probs is not None:  # eager attention from the probabilities the loss reads anyway
            out = (dense_probs @ expand_kv_heads(value, H)).transpose(1, 2).contiguous()  # (B, T, H, hd)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling,
                                            is_causal=True)
        used_probs = None if dense_probs is None else dense_probs.detach()
    else:
        # A CSR pattern only where the CSR kernels are the ones used (the fused kernels need none).
        pattern = SelectionPattern(selected) if csr_kernels_available(q) and not fused_kernels_available(q) else None
        need_probs = run.indexer_loss == "selected" or run.trace
        # The checkpoint's own key/value heads: the fused kernel reads each once for its group of
        # query heads (the other kernels repeat them).
        y, selected_probs = gathered_sparse_attention(q, key, value, selected, return_probs=need_probs,
                                                      check_order=False, pattern=pattern,
                                                      sum_heads=not run.trace)  # (B, H, T, hd)
        out = y.transpose(1, 2).contiguous()  # (B, T, H, hd) as transformers' attention functions return
        used_probs = scatter_selected(selected_probs, selected, T).detach() if run.trace else None
        if run.trace and selected_probs is not None:
            selected_probs = selected_probs.sum(1)  # (B, H, T, k) -> (B, T, k)

    if full_target:
        target = dense_probs.detach().sum(1)  # (B, T, T), L1-normalised inside indexer_kl
        index_scores, _ = indexer(normed, *run.indexer_rope)  # (B, T, T); -inf on future keys
        run.kl[layer] = indexer_kl(target, index_scores, torch.isfinite(index_scores)).mean()
    elif run.indexer_loss == "all":
        recompute = owner.warmup_kl == "checkpointed"
        run.kl[layer] = blockwise_causal_kl(*projected, q, expand_kv_heads(key, H), run.block_size,
                                            recompute=recompute).mean()
    elif run.indexer_loss == "selected":
        if selected is None:
            raise ValueError("indexer_loss='selected' needs attention='sparse'")
        target = selected_probs.detach()  # (B, T, k): the sparse attention used, summed over heads
        run.kl[layer] = selected_index_kl(*projected, selected, target, pattern=pattern).mean()
    if run.trace:
        dense_probs = dense_probs.detach()
        with torch.no_grad():  # the full-matrix reference: (B, T, T) scores, (B, H_I, T, T) head terms
            index_scores, head_terms = indexer(normed, *run.indexer_rope, return_head_terms=True)
        run.traces[layer] = AttentionTrace(selected=selected, index_scores=index_scores, index_head_terms=head_terms,
                                           attn_probs=used_probs, dense_attn_probs=dense_probs)
    return out, None


def register_retrofit_attention() -> None:
    """Register RETROFIT_ATTENTION with transformers (the function, and SDPA's mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if RETROFIT_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(RETROFIT_ATTENTION, retrofit_attention_forward)
        AttentionMaskInterface.register(RETROFIT_ATTENTION, sdpa_mask)
