"""Sparse inference for an unmodified Hugging Face model: prefill and decode that attend only to
the k keys a selector picks, with transformers' own KV cache and an indexer key cache per layer.

`selected_attention.py` runs a selection as a mask over the model's full (T, T) attention: the
readable reference, no cache. Here each layer instead

- in a prefill (no past keys) ranks keys with the fused top-k (`blockwise_topk`: the indexer's
  scores are never stored whole) and attends with `gathered_sparse_attention` (the fused CPU
  kernel where built): O(T * k) attention work and memory;
- in a decode step (past keys in the cache) scores the new query against the cached indexer keys
  (one (1, S) row), takes its top-k, and attends over those k rows of the KV cache.

It plugs in through transformers' attention registry (`AttentionInterface`) and a forward
pre-hook on each attention module (the normed input an indexer reads); the KV cache is the
model's own `Cache`, whatever `generate` or the caller made. The indexer key cache holds each
layer's rotated, normed indexer keys (B, S, d_I) in the indexer's dtype (the model's: float32
or bfloat16; DeepSeek's fp8 with block scales is not done here).

Selection per row is that of `selectors.py` (`topk_causal`, `local_window`, `sink_plus_local`,
`oracle`: the top-k of the row's dense attention summed over heads), so a decode step selects
exactly the last row of a prefill one token longer. Left-padded batches are run per sequence on
its unpadded part: RoPE scores depend only on relative positions, so a padded row selects as it
would alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_viz.errors import UserInputError
from sparse_viz.model.attention import expand_kv_heads, gathered_sparse_attention
from sparse_viz.model.indexer_blocks import blockwise_topk
from sparse_viz.model.rope import rope_tables
from sparse_viz.model.selectors import local_window, sink_plus_local, topk_causal, topk_earliest_ties
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.selected_attention import KeySelection

SPARSE_INFERENCE_ATTENTION = "sparse_viz_sparse_inference"
# Selectors a decode step can reproduce row by row (`random` draws a whole (T, T) matrix per call).
INFERENCE_SELECTORS = ("dense", "topk", "local", "sink_local", "oracle")


class IndexerKeyCache:
    """One layer's indexer keys (B, S, d_I) in a buffer that grows by doubling: appending a decode
    step's key copies one row, not the whole cache (as `torch.cat` would, every step)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # (B, capacity, d_I)
        self.length = 0

    def reset(self, keys: torch.Tensor) -> torch.Tensor:
        """Start over with `keys` (B, S, d_I); returns the cached keys (B, S, d_I)."""
        self.buffer, self.length = None, 0
        return self.append(keys)

    def append(self, keys: torch.Tensor) -> torch.Tensor:
        """Add `keys` (B, T, d_I) after the cached ones; returns all of them (B, S, d_I), a view."""
        B, T, d = keys.shape
        needed = self.length + T
        if self.buffer is None or self.buffer.shape[1] < needed or self.buffer.shape[0] != B:
            grown = keys.new_empty(B, max(needed, 2 * (0 if self.buffer is None else self.buffer.shape[1])), d)
            if self.buffer is not None and self.length:
                grown[:, :self.length] = self.buffer[:, :self.length]
            self.buffer = grown
        self.buffer[:, self.length:needed] = keys
        self.length = needed
        return self.buffer[:, :needed]

    def keys(self) -> torch.Tensor | None:
        """(B, S, d_I) the cached keys, or None."""
        return None if self.buffer is None else self.buffer[:, :self.length]


class SparseInference:
    """The state of sparse inference installed on one model: its selection and indexer key cache.

    Args:
        model: the Hugging Face causal LM (full causal attention in every layer).
        selection: selector, k, sink tokens, dense layers and (for `topk`) the indexers.
    """

    def __init__(self, model: nn.Module, selection: KeySelection) -> None:
        if selection.selector not in INFERENCE_SELECTORS:
            raise UserInputError(f"selector {selection.selector!r} cannot decode with caches; choose one of "
                                 f"{', '.join(INFERENCE_SELECTORS)}")
        self.model = model
        self.selection = selection
        self.adapter = ArchitectureAdapter.for_model(model)
        if selection.indexers is not None and len(selection.indexers) != self.adapter.n_layers:
            raise UserInputError(f"{len(selection.indexers)} indexers for a model with {self.adapter.n_layers} layers")
        windows = [i for i in range(self.adapter.n_layers) if self.adapter.sliding_window(i)]
        if windows and selection.selector != "dense":
            raise UserInputError(f"sparse inference needs full causal attention; layers {windows} use a sliding window")
        self.normed: dict[int, torch.Tensor] = {}  # layer -> (B, T, D) of the current forward
        self.indexer_keys: dict[int, IndexerKeyCache] = {}  # layer -> its indexer key cache
        self.last_selected: dict[int, torch.Tensor] = {}  # layer -> (B, T, k) absolute key indices, -1 unfilled
        self._undo: Callable[[], None] | None = None

    # ----------------------------------------------------------------- install
    def install(self) -> SparseInference:
        """Route every attention layer through `sparse_inference_attention_forward`; returns self."""
        register_sparse_inference_attention()
        previous = self.model.config._attn_implementation
        handles = []
        for i in range(self.adapter.n_layers):
            attention = self.adapter.attention(i)
            object.__setattr__(attention, "_sparse_viz_inference", self)
            if self.selection.selector == "topk":
                handles.append(attention.register_forward_pre_hook(self._remember_normed_input(i), with_kwargs=True))
        self.model.set_attn_implementation(SPARSE_INFERENCE_ATTENTION)
        object.__setattr__(self.model, "_sparse_viz_inference", self)

        def undo() -> None:
            for handle in handles:
                handle.remove()
            for i in range(self.adapter.n_layers):
                self.adapter.attention(i).__dict__.pop("_sparse_viz_inference", None)
            self.model.__dict__.pop("_sparse_viz_inference", None)
            self.model.set_attn_implementation(previous)
            self.indexer_keys.clear()
            self.normed.clear()

        self._undo = undo
        return self

    def uninstall(self) -> None:
        """Restore the model's own attention."""
        if self._undo is not None:
            self._undo()
            self._undo = None

    def _remember_normed_input(self, layer: int):
        def hook(module, args, kwargs):
            self.normed[layer] = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        return hook

    # ----------------------------------------------------------------- selection
    def indexer_projections(self, layer: int, past: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' indexer queries and weights, and every cached indexer key.

        Returns:
            q (B, T, H_I, d_I), k (B, S, d_I) with S = past + T, w (B, T, H_I).
        """
        normed = self.normed.pop(layer)  # (B, T, D)
        T = normed.shape[1]
        cos, sin = rope_tables(self.selection.indexer_rope_dim, past + T, self.selection.indexer_rope_theta, start=past)
        cos, sin = cos.to(normed.device), sin.to(normed.device)
        with torch.no_grad():
            q, k_new, w = self.selection.indexers[layer].project(normed, cos, sin)
        cache = self.indexer_keys.setdefault(layer, IndexerKeyCache())
        if past == 0:
            return q, cache.reset(k_new), w
        if cache.length != past:
            raise UserInputError(f"the indexer key cache of layer {layer} holds {cache.length} keys, the KV cache "
                                 f"{past}: start a new generation (a prefill) instead of continuing another")
        return q, cache.append(k_new), w  # (B, S, d_I)

    def prefill_selection(self, layer: int, q: torch.Tensor, key: torch.Tensor, scaling: float,
                          projected) -> torch.Tensor:
        """One sequence's selection (1, T, k) for a prefill of its T tokens (no past, no padding).

        Args:
            q: (1, H, T, hd) queries; key: (1, Hkv, T, hd) keys (for `oracle`).
            projected: (q_I, k_I, w) of the sequence (for `topk`), else None.
        """
        selection, T = self.selection, q.shape[2]
        if selection.selector == "topk":
            return blockwise_topk(*projected, selection.top_k)  # (1, T, k), scores never stored whole
        if selection.selector == "local":
            return local_window(1, T, selection.top_k, q.device)
        if selection.selector == "sink_local":
            return sink_plus_local(1, T, selection.top_k, selection.sink_tokens, q.device)
        probs = dense_attention_probs(q, key, scaling)  # oracle: (1, H, T, T), its definition needs them
        return topk_causal(probs.sum(1), selection.top_k)

    def row_selection(self, layer: int, position: int, q: torch.Tensor, key: torch.Tensor, scaling: float,
                      projected) -> torch.Tensor:
        """The selection (k,) of one query at `position` over keys 0..position (a decode step): the
        row `position` of the prefill selection of `position` + 1 tokens.

        Args:
            q: (1, H, 1, hd) the query; key: (1, Hkv, position + 1, hd) the cached keys.
            projected: (q_I (1, 1, H_I, d_I), k_I (1, position + 1, d_I), w (1, 1, H_I)) for `topk`.
        """
        selection, S = self.selection, position + 1
        top_k = selection.top_k
        if S <= top_k:  # short rows are dense
            return torch.arange(S, device=q.device)
        if selection.selector == "local":
            return torch.arange(S - top_k, S, device=q.device)
        if selection.selector == "sink_local":
            local = top_k - selection.sink_tokens
            return torch.cat((torch.arange(selection.sink_tokens, device=q.device),
                              torch.arange(S - local, S, device=q.device)))
        if selection.selector == "topk":
            q_i, k_i, w = projected
            logits = torch.relu(q_i[0, 0] @ k_i[0].transpose(0, 1))  # (H_I, S)
            scores = (w[0, 0].float() @ logits.float())  # (S,)
        else:  # oracle
            scores = dense_attention_probs(q, key, scaling).sum(1)[0, 0]  # (S,)
        return topk_earliest_ties(scores, top_k).sort().values


def dense_attention_probs(q: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, H, T, S) causal softmax of q against every key, the last T keys being the queries' own
    positions (float32)."""
    H, T, S = q.shape[1], q.shape[2], key.shape[2]
    scores = (q @ expand_kv_heads(key, H).transpose(2, 3)).float() * scaling  # (B, H, T, S)
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)  # (T, S)
    return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def sequence_spans(attention_mask: torch.Tensor | None, batch_size: int, length: int,
                   position_ids: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Each sequence's keys as (first, end): left padding before `first`, and from `end` on the
    unfilled rows of a preallocated (static) cache.

    `first` is read from the last query's row of the mask. `end` is the last query's position
    plus one, counted from the first real token (transformers numbers positions so under left
    padding); a static cache's mask cannot tell it (SDPA's mask builder may skip the mask of a
    prefill into a longer cache).

    Args:
        attention_mask: (B, 1, T, S) bool (True = attend) or additive float, or None.
        length: S, the keys the attention function was given.
        position_ids: (B, T) or (1, T) positions of the queries, if the model passed them.
    """
    allowed = None
    if attention_mask is not None:
        row = attention_mask[:, 0, -1, :]  # (B, S): the last query sees every real key
        allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    spans = []
    for b in range(batch_size):
        first = 0 if allowed is None else int(allowed[b].nonzero()[0])
        if position_ids is not None:
            end = first + int(position_ids[min(b, position_ids.shape[0] - 1), -1]) + 1
        else:
            end = length if allowed is None else int(allowed[b].nonzero()[-1]) + 1
        if allowed is not None and not bool(allowed[b, first:end].all()):
            raise UserInputError("sparse inference needs left padding (a padded key between real ones)")
        spans.append((first, end))
    return spans


def sparse_inference_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                       value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                                       dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """One layer's attention over its selected keys (registered as SPARSE_INFERENCE_ATTENTION).

    Args:
        query: (B, H, T, hd) the new tokens; key, value: (B, Hkv, S, hd) the whole cache after this
            step's update (S = T in a prefill; a static cache's unfilled rows too), post-RoPE.
        attention_mask: from transformers' SDPA mask builder: None, or (B, 1, T, S) marking left
            padding and a static cache's unfilled rows.

    Returns:
        (attn_output (B, T, H, hd), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: SparseInference | None = getattr(module, "_sparse_viz_inference", None)
    layer = module.layer_idx
    if state is None or state.selection.is_dense(layer):
        if state is not None:
            state.normed.pop(layer, None)  # a dense layer's indexer is never read
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, H, T, hd = query.shape
    spans = sequence_spans(attention_mask, B, key.shape[2], kwargs.get("position_ids"))
    S = spans[0][1]  # the keys up to this step's last token: the same end for every (left-padded) row
    past = S - T
    projected = state.indexer_projections(layer, past) if state.selection.selector == "topk" else None
    out = query.new_zeros(B, T, H, hd)
    chosen = torch.full((B, T, min(state.selection.top_k, S)), -1, dtype=torch.long, device=query.device)
    for b, (pad, _) in enumerate(spans):
        # The sequence's own keys and queries: rows before `pad` are padding (left zero).
        first = max(pad - past, 0)  # the first of this step's queries that is a real token
        if first >= T:
            continue
        q_b, k_b, v_b = query[b:b + 1, :, first:], key[b:b + 1, :, pad:S], value[b:b + 1, :, pad:S]
        proj_b = None
        if projected is not None:
            q_i, k_i, w = projected
            proj_b = (q_i[b:b + 1, first:], k_i[b:b + 1, pad:], w[b:b + 1, first:])
        if past <= pad:  # a prefill of this sequence: every key is one of its queries
            selected = state.prefill_selection(layer, q_b, k_b, scaling, proj_b)  # (1, T_b, k)
            # The project's kernels scale scores by hd**-0.5: fold in the model's own `scaling`.
            y, _ = gathered_sparse_attention(q_b * (scaling * math.sqrt(hd)), k_b, v_b, selected,
                                             check_order=False)  # (1, H, T_b, hd)
            out[b, first:] = y[0].transpose(0, 1)
            chosen[b, first:, :selected.shape[-1]] = torch.where(selected >= 0, selected + pad, -1)[0]
            continue
        for t in range(first, T):  # decode: one row per new token (T = 1 in generation)
            position = past + t - pad  # the query's index among the sequence's own keys
            row_keys = k_b[:, :, :position + 1]
            row_proj = None
            if proj_b is not None:
                row_proj = (proj_b[0][:, t - first:t - first + 1], proj_b[1][:, :position + 1],
                            proj_b[2][:, t - first:t - first + 1])
            q_t = query[b:b + 1, :, t:t + 1]  # (1, H, 1, hd)
            keys = state.row_selection(layer, position, q_t, row_keys, scaling, row_proj)  # (k_t,)
            out[b, t] = attend_to_rows(q_t[0, :, 0], k_b[0], v_b[0], keys, scaling)
            chosen[b, t, :keys.numel()] = keys + pad
    state.last_selected[layer] = chosen
    return out, None


def attend_to_rows(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """One query's attention over `rows` of the KV cache (only those rows are read).

    Args:
        q: (H, hd); key, value: (Hkv, S, hd); rows: (k,) long key indices.

    Returns:
        (H, hd).
    """
    H, hd = q.shape
    Hkv = key.shape[0]
    k_rows, v_rows = key[:, rows], value[:, rows]  # (Hkv, k, hd): the selected rows only
    q_grouped = q.view(Hkv, H // Hkv, hd)  # query head h reads KV head h // (H / Hkv)
    weights = F.softmax((q_grouped @ k_rows.transpose(1, 2)).float() * scaling, dim=-1)  # (Hkv, H/Hkv, k)
    return (weights.to(v_rows.dtype) @ v_rows).reshape(H, hd)


def register_sparse_inference_attention() -> None:
    """Register SPARSE_INFERENCE_ATTENTION with transformers (the function, and SDPA's mask
    builder: None where plain causal, else a bool mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if SPARSE_INFERENCE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(SPARSE_INFERENCE_ATTENTION, sparse_inference_attention_forward)
        AttentionMaskInterface.register(SPARSE_INFERENCE_ATTENTION, sdpa_mask)


def install_sparse_inference(model: nn.Module, selection: KeySelection) -> SparseInference:
    """Make `model` (its forward and `generate`, with or without a cache) attend sparsely.

    Returns:
        The installed `SparseInference` (`.uninstall()` restores the model's own attention).

    Raises:
        UserInputError: a selector that cannot decode, indexers for another number of layers, a
            sliding-window layer.
    """
    return SparseInference(model, selection).install()


def load_sparse_model(model: str, indexers: str | None = None, selector: str = "topk", k: int = 256,
                      sink_tokens: int = 4, dense_layers: int = 0, device: str = "auto", dtype: str = "float32"):
    """Load a Hugging Face model (and its retrofitted indexers) for sparse inference.

    Args:
        model: the model's directory (or hub id when online).
        indexers: a retrofit run's checkpoint (`results/<run>/checkpoints/last.ckpt`), needed by `topk`.
        selector: one of INFERENCE_SELECTORS.
        k: keys per query.
        sink_tokens: first keys kept by `sink_local`.
        dense_layers: the first this-many layers attend densely.
        device, dtype: as `load_model`.

    Returns:
        The `LoadedModel`, its `.model` attending sparsely in every forward and in `.generate(...)`;
        `.model._sparse_viz_inference` is the installed `SparseInference`.

    Raises:
        UserInputError: a bad model path, indexers of another model, `topk` without indexers, k < 1.
    """
    from sparse_viz.pretrained.loading import load_model
    from sparse_viz.pretrained.retrofit_indexers import load_retrofit_indexers

    if selector == "topk" and not indexers:
        raise UserInputError("selector topk needs trained indexers: --indexers results/<retrofit run>/checkpoints/last.ckpt")
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}")
    loaded = load_model(model, device=device, dtype=dtype)
    trained, settings = None, {}
    if indexers:
        trained = load_retrofit_indexers(indexers, model, loaded.adapter)
        trained.to(device=loaded.device, dtype=loaded.dtype).eval()
        settings = dict(indexer_rope_dim=trained.settings["rope_dim"], indexer_rope_theta=trained.settings["rope_theta"])
    selection = KeySelection(selector, top_k=k, sink_tokens=sink_tokens, dense_layers=dense_layers,
                             indexers=trained, **settings)
    install_sparse_inference(loaded.model, selection)
    return loaded
