"""Attention restricted to selected keys inside an unmodified Hugging Face model.

A `KeySelection` says which keys each query of each layer may attend to: DSA's `topk` of
Lightning Indexers attached to the model, or a baseline (`dense`, `local`, `sink_local`,
`random`, `oracle` = top-k of the layer's own attention summed over heads), at any k, with the
first `dense_layers` layers left dense. Every head of a layer uses the same keys (REFERENCE §1).

`install_selection(model, selection)` plugs it in through transformers' own extension points:
an attention function registered in `AttentionInterface` (the model's eager attention plus the
selection, as an additive mask) and a forward pre-hook on each layer's attention module, which
sees the layer's normed input (what an indexer reads). No modeling code is copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.model.attention import expand_kv_heads, selection_mask
from sparse_viz.model.config import SELECTORS
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import select_keys
from sparse_viz.pretrained.adapter import ArchitectureAdapter

ATTENTION_NAME = "sparse_viz_selected"


@dataclass
class KeySelection:
    """Which keys each query attends to, per layer.

    Attributes:
        selector: one of SELECTORS.
        top_k: keys per query (rows with t + 1 <= top_k stay dense).
        sink_tokens: first keys kept by `sink_local`.
        seed: seed of `random`.
        dense_layers: the first this-many layers attend densely whatever the selector.
        indexers: one `LightningIndexer` per layer (required by `topk`); each reads its layer's
            normed attention input.
        indexer_rope_dim: leading dims of the indexers' q/k that get RoPE.
        indexer_rope_theta: RoPE base of the indexers' rotated dims.
    """

    selector: str = "dense"
    top_k: int = 64
    sink_tokens: int = 4
    seed: int = 0
    dense_layers: int = 0
    indexers: nn.ModuleList | None = None
    indexer_rope_dim: int = 0
    indexer_rope_theta: float = 10000.0
    _normed: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    last_selected: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise UserInputError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.top_k < 1:
            raise UserInputError(f"k must be >= 1, got {self.top_k}")
        if self.selector == "sink_local" and not 0 <= self.sink_tokens < self.top_k:
            raise UserInputError(f"sink_local needs 0 <= sink_tokens < k (sink_tokens {self.sink_tokens}, k {self.top_k})")
        if self.selector == "topk" and self.indexers is None:
            raise UserInputError("selector 'topk' needs trained indexers")
        if self.dense_layers < 0:
            raise UserInputError(f"dense_layers must be >= 0, got {self.dense_layers}")

    @property
    def label(self) -> str:
        """What ran, for results: e.g. "topk k=64 (first 2 layers dense)"."""
        if self.selector == "dense":
            return "dense"
        text = f"{self.selector} k={self.top_k}"
        if self.selector == "sink_local":
            text += f" sinks={self.sink_tokens}"
        return text + (f" (first {self.dense_layers} layers dense)" if self.dense_layers else "")

    def is_dense(self, layer: int) -> bool:
        return self.selector == "dense" or layer < self.dense_layers

    def index_scores(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """(B, T, T) the layer's indexer scores of its normed input (B, T, D)."""
        indexer = self.indexers[layer]
        T = normed.shape[1]
        cos, sin = rope_tables(self.indexer_rope_dim, T, self.indexer_rope_theta)
        scores, _ = indexer(normed, cos.to(normed.device), sin.to(normed.device))
        return scores

    def selected(self, layer: int, batch_size: int, seq_len: int, device: torch.device | str,
                 normed: torch.Tensor | None = None, dense_probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer's selection (B, T, k) long (-1 = unfilled), or None when the layer is dense.

        Args:
            layer: layer index.
            batch_size, seq_len, device: B, T and where the selection lives.
            normed: (B, T, D) the layer's normed attention input (used by `topk`).
            dense_probs: (B, H, T, T) the layer's dense causal attention (used by `oracle`).
        """
        if self.is_dense(layer):
            return None
        B, T = batch_size, seq_len
        scores = self.index_scores(layer, normed) if self.selector == "topk" else None
        return select_keys(self.selector, top_k=self.top_k, seq_len=T, index_scores=scores, dense_probs=dense_probs,
                           sink_tokens=self.sink_tokens, seed=self.seed, batch_size=B, device=device)

    def keep(self, layer: int, batch_size: int, seq_len: int, device: torch.device | str,
             normed: torch.Tensor | None = None, dense_probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T, T) bool, True where query t may attend to key s under the selection; None = dense.
        Arguments as `selected`."""
        selected = self.selected(layer, batch_size, seq_len, device, normed, dense_probs)
        if selected is None:
            return None
        self.last_selected[layer] = selected  # what the layer attended to in the latest forward
        return selection_mask(selected, seq_len)


def selected_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as transformers computes it) with the layer's key selection added.

    Args:
        query: (B, H, T, hd); key, value: (B, Hkv, S, hd), post-RoPE; attention_mask: additive
            (B, 1, T, S) from the model (causal, padding, sliding window) or None.

    Returns:
        (attn_output (B, T, H, hd), attn_weights (B, H, T, S)).
    """
    key, value = expand_kv_heads(key, query.shape[1]), expand_kv_heads(value, query.shape[1])  # (B, H, S, hd)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    selection: KeySelection | None = getattr(module, "_sparse_viz_selection", None)
    if selection is not None and not selection.is_dense(module.layer_idx):
        if scores.shape[-1] != scores.shape[-2]:
            raise UserInputError("selected attention needs the whole sequence in one forward (no cache)")
        dense_probs = F.softmax(scores, dim=-1, dtype=torch.float32) if selection.selector == "oracle" else None
        B, _, T, _ = scores.shape
        keep = selection.keep(module.layer_idx, B, T, scores.device, selection._normed.get(module.layer_idx),
                              dense_probs)  # (B, T, T)
        scores = scores.masked_fill(~keep[:, None], torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register_selected_attention() -> None:
    """Register `ATTENTION_NAME` with transformers (the attention function and its mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, selected_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


@contextlib.contextmanager
def selection_installed(model: nn.Module, selection: KeySelection) -> Iterator[None]:
    """Run `model` with `selection` while open (see `install_selection`)."""
    undo = install_selection(model, selection)
    try:
        yield
    finally:
        undo()


def install_selection(model: nn.Module, selection: KeySelection):
    """Make every attention layer of `model` attend only to `selection`'s keys.

    Returns:
        A function that restores the model's own attention.

    Raises:
        UserInputError: an unsupported architecture, or indexers for another number of layers.
    """
    register_selected_attention()
    adapter = ArchitectureAdapter.for_model(model)
    if selection.indexers is not None and len(selection.indexers) != adapter.n_layers:
        raise UserInputError(f"{len(selection.indexers)} indexers for a model with {adapter.n_layers} layers")
    previous = model.config._attn_implementation
    handles = []

    def remember_normed_input(layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            selection._normed[layer] = hidden  # (B, T, D): what the layer's indexer reads
        return hook

    for i in range(adapter.n_layers):
        attention = adapter.attention(i)
        attention._sparse_viz_selection = selection
        if selection.selector == "topk":
            handles.append(attention.register_forward_pre_hook(remember_normed_input(i), with_kwargs=True))
    model.set_attn_implementation(ATTENTION_NAME)
    model._sparse_viz_selection = selection  # read by ArchitectureAdapter.selection

    def undo() -> None:
        model.__dict__.pop("_sparse_viz_selection", None)
        for handle in handles:
            handle.remove()
        for i in range(adapter.n_layers):
            adapter.attention(i).__dict__.pop("_sparse_viz_selection", None)
        selection._normed.clear()
        model.set_attn_implementation(previous)

    return undo
