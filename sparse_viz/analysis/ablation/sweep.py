"""The batched sweep engine shared by head and component ablation.

Many ablations, one baseline: the prompt batch (N sequences) is replicated once per ablation
along the batch dim, batch row `a*N + n` carries ablation a on sequence n, and the caller's hooks
apply a per-row edit, so k ablations share one forward.

Prefix reuse (`reuse_prefix`): an ablation whose first edited layer is L cannot change layers
< L, so its rows need not run them. The ablations are ordered by first layer and each one's rows
JOIN the batch at its own first layer, from the recorded input of that layer: at layer i the
batch holds the rows of the ablations starting at or before i, always a prefix of the row list
(hence the hooks slice their per-row masks to the rows present). A chunk that mixes layers then
does no more work than one forward per layer would.

Position offsets (`first_position`): an ablation confined to positions >= p leaves every earlier
position as the baseline had it, at every layer (attention is causal). Its chunk then runs only
positions >= p, attending to the baseline's keys and values of the earlier ones
(`PrefixKeyValues`); the hooks slice their per-position masks to the last positions.

Every ablation is compared with the same baseline (`BaselineDistribution`) over ALL positions
of ALL sequences. The reference path (`reuse_prefix=False`, `batch_size=1`) is one full forward
per ablation; both ablation kinds test that the two agree.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ContextManager

import numpy as np
import pandas as pd
import torch
from torch import nn

from sparse_viz.analysis.ablation.metrics import (
    BaselineDistribution,
    prediction_table,
    token_text,
)
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter
from sparse_viz.pretrained.selected_attention import (
    ATTENTION_NAME as SELECTED_ATTENTION,
)

# Rows per LM-head call in a sweep: bounds the (rows, V) fp32 logits alive at once (2048 rows of
# Qwen3's 151,936-token vocabulary: 1.2 GB) whatever the batch size. Smaller slices cost speed:
# 64 rows (one ablation) ran 1.2x slower than the whole 1728-row chunk (bench_head_sweep.py).
LM_HEAD_ROWS = 2048

# rows (one ablation per batch row) and T -> context manager that applies them to the model
RowHooks = Callable[[Sequence[Any], int], ContextManager]


# --------------------------------------------------------------------------------------------
# Forwards.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eager_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Switch a HF model to eager attention (the only one that returns probabilities) and back.

    A model whose attention is restricted to a key selection keeps it: that attention is eager too.
    """
    previous = getattr(model.config, "_attn_implementation", None)
    if not enabled or previous in ("eager", SELECTED_ATTENTION):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   patterns: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """One forward; returns fp32 logits (B, T, V) and, if asked, per-layer attention (B, H, T, T)."""
    with eager_attention(model, patterns):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=patterns, use_cache=False)
    return out.logits.float(), (tuple(out.attentions) if patterns else None)


# --------------------------------------------------------------------------------------------
# Prefix reuse.
# --------------------------------------------------------------------------------------------


@dataclass
class LayerInputs:
    """What the model passed to each decoder layer in one forward (hidden states and kwargs)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, T, D)
    kwargs: dict[int, dict] = field(default_factory=dict)


@contextlib.contextmanager
def record_layer_inputs(model: nn.Module, record: LayerInputs) -> Iterator[None]:
    """Record each decoder layer's input hidden states and keyword arguments while open."""
    adapter = ArchitectureAdapter.for_model(model)
    handles = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            record.hidden[i] = args[0] if args else kwargs["hidden_states"]
            record.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    try:
        for i, layer in enumerate(adapter.layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class PrefixKeyValues:
    """The baseline's keys and values of positions < offset, offered to attention as a cache.

    An ablation confined to positions >= offset leaves every earlier position unchanged at every
    layer (causal attention), so a sweep runs only the positions >= offset and lets them attend
    to these recorded keys/values. Duck-types the one Cache method HF Llama/Qwen3 attention calls
    (`update`), and never grows: it can serve every chunk of a sweep.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], offset: int):
        self.keys, self.values, self.offset = keys, values, offset  # layer -> (N, Hkv, T, hd)

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> PrefixKeyValues:
        """Every layer's post-RoPE keys and values of one baseline forward (offset set later)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 rename
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{name: cache})
        keys = {i: layer.keys for i, layer in enumerate(cache.layers)}
        values = {i: layer.values for i, layer in enumerate(cache.layers)}
        return cls(keys, values, 0)

    def at(self, offset: int) -> PrefixKeyValues:
        return PrefixKeyValues(self.keys, self.values, offset)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """(B, Hkv, T', hd) keys/values of positions >= offset -> those of all positions."""
        copies = key_states.shape[0] // self.keys[layer_idx].shape[0]
        k = self.keys[layer_idx][:, :, : self.offset].repeat(copies, 1, 1, 1)  # (B, Hkv, offset, hd)
        v = self.values[layer_idx][:, :, : self.offset].repeat(copies, 1, 1, 1)
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)


def _suffix_kwargs(kwargs: dict, offset: int, T: int, prefix: PrefixKeyValues | None, device) -> dict:
    """A decoder layer's recorded kwargs for queries at positions >= offset only."""
    if offset == 0:
        return kwargs
    out = dict(kwargs)
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is not None:
        out["position_embeddings"] = tuple(t[..., offset:, :] for t in cos_sin)  # (B, T', hd)
    for name in ("position_ids", "cache_position"):
        if isinstance(kwargs.get(name), torch.Tensor):
            out[name] = kwargs[name][..., offset:]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = mask[..., offset:, :]  # (B, 1, T', T): suffix queries, every key
    else:  # no padding: the model relied on is_causal, which cannot express a query offset
        query = torch.arange(offset, T, device=device)[:, None]
        out["attention_mask"] = (torch.arange(T, device=device)[None, :] <= query)[None, None]  # (1, 1, T', T) bool
    # transformers 5.24 renamed the layers' `past_key_values` argument to `cache`: use the name the
    # model itself passed to this layer
    out["cache" if "cache" in kwargs else "past_key_values"] = prefix.at(offset)
    return out


def _tile(value, n: int, k: int):
    """Repeat batch-dim tensors (leading dim n, at least 2-D) k times; leave the rest alone."""
    if isinstance(value, torch.Tensor):
        return value.repeat(k, *[1] * (value.dim() - 1)) if value.dim() >= 2 and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_tile(v, n, k) for v in value)
    return value


@torch.no_grad()
def forward_from_layers(model: nn.Module, inputs: LayerInputs, starts: Sequence[int], patterns: bool = False,
                        offset: int = 0, prefix: PrefixKeyValues | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run copy a of the N recorded sequences from layer starts[a] on; all copies to the logits.

    The reference path is a full forward (`forward_logits`); this one skips, for each copy, the
    layers before its start, which no edit at or after that layer can change. Copy a joins the
    batch at layer starts[a] with the recorded input of that layer, so at layer i the batch
    holds copies 0 .. (last with start <= i): a prefix. Text decoders only (the loop reproduces
    Llama/Qwen3's `layers -> norm -> lm_head`; Qwen3-VL's DeepStack additions for images are not
    replayed).

    With `offset` > 0 only positions >= offset run (queries T' = T - offset), attending to
    the baseline's keys/values of the earlier positions (`prefix`): exact when no edit touches
    a position < offset.

    Args:
        inputs: recorded by `record_layer_inputs`.
        starts: (k,) non-decreasing first layer of each copy.
        offset: first position to run; prefix: the baseline's keys/values (needed if offset > 0).
    Returns:
        the final-norm output (k*N, T', D) (row a*N + n: copy a of sequence n; the caller applies
        the LM head a slice at a time, see `LM_HEAD_ROWS`), and, if asked,
        {layer: (rows present at that layer, H, T', T)} attention of the layers that ran.
    """
    if list(starts) != sorted(starts):
        raise ValueError(f"starts must be non-decreasing, got {list(starts)}")
    adapter = ArchitectureAdapter.for_model(model)
    N = inputs.hidden[starts[0]].shape[0]
    joining = Counter(starts)  # layer -> copies that join there
    attn: dict[int, torch.Tensor] = {}
    handles = []
    if patterns:
        for i in range(starts[0], adapter.n_layers):
            handles.append(adapter.attention(i).register_forward_hook(
                lambda m, a, out, i=i: attn.__setitem__(i, out[1])))
    h = None
    try:
        with eager_attention(model, patterns):
            for i in range(starts[0], adapter.n_layers):
                if i in joining:
                    new = inputs.hidden[i][:, offset:].repeat(joining[i], 1, 1)  # (copies * N, T', D)
                    h = new if h is None else torch.cat([h, new])  # (rows present, T', D)
                k = h.shape[0] // N
                T = inputs.hidden[i].shape[1]
                kwargs = _suffix_kwargs(inputs.kwargs[i], offset, T, prefix, h.device)
                kwargs = {name: _tile(v, N, k) for name, v in kwargs.items()}
                h = adapter.layers[i](h, **kwargs)
                h = h[0] if isinstance(h, tuple) else h
    finally:
        for handle in handles:
            handle.remove()
    return adapter.final_norm(h), attn  # (k*N, T', D): the LM head's input


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What a sweep produced, one entry per ablation (its CSV, npz, PNGs and report are made of it).

    Attributes:
        table: one row per ablation (columns depend on the ablation kind).
        ablations: in table order (each has a `.name`).
        kl_per_position: (A, N, T) KL(baseline || ablated), NaN on padding.
        input_ids: (N, T); valid: (N, T) bool; tokens: per sequence, its token strings.
        baseline_patterns: {layer: (N, H, T, T)} per sequence, never averaged (empty if not captured).
        ablated_patterns: per ablation, {layer: (N, H, T, T)} at its pattern layers.
        predictions: per ablation, the top-k table at the chosen positions (`prediction_table`).
    """

    table: pd.DataFrame
    ablations: list
    kl_per_position: np.ndarray
    input_ids: np.ndarray
    valid: np.ndarray
    tokens: list[list[str]]
    baseline_patterns: dict[int, np.ndarray] = field(default_factory=dict)
    ablated_patterns: list[dict[int, np.ndarray]] = field(default_factory=list)
    predictions: list[list[dict]] = field(default_factory=list)


@dataclass
class SweepRun:
    """What one sweep measured, before an ablation kind turns it into its own table.

    Attributes:
        metrics: per ablation, the summary of `BaselineDistribution.compare` as floats.
        kl_per_position: (A, N, T) KL(baseline || ablated), NaN on padding.
        predictions: per ablation, the prediction table at the chosen positions.
        baseline_patterns: {layer: (N, H, T, T)} per sequence (empty if not captured).
        ablated_patterns: per ablation, {layer: (N, H, T, T)} at its pattern layers.
        input_ids: (N, T); valid: (N, T) bool; tokens: per sequence, its token strings.
    """

    metrics: list[dict[str, float]]
    kl_per_position: np.ndarray
    predictions: list[list[dict]]
    input_ids: np.ndarray
    valid: np.ndarray
    tokens: list[list[str]]
    baseline_patterns: dict[int, np.ndarray] = field(default_factory=dict)
    ablated_patterns: list[dict[int, np.ndarray]] = field(default_factory=list)

    def result_fields(self) -> dict[str, Any]:
        """The `SweepResult` fields this run fills (all but table and ablations)."""
        return {f.name: getattr(self, f.name) for f in fields(SweepResult) if f.name not in ("table", "ablations")}


def _full_pattern(ablated: torch.Tensor, baseline: np.ndarray) -> np.ndarray:
    """(N, H, T', T) attention of the last T' queries -> (N, H, T, T), earlier rows the baseline's."""
    ablated = ablated.float().cpu().numpy()
    offset = baseline.shape[2] - ablated.shape[2]
    return ablated if offset == 0 else np.concatenate([baseline[:, :, :offset], ablated], axis=2)


def prediction_pairs(valid: torch.Tensor, positions: Sequence[int] | None) -> list[tuple[int, int]]:
    """(sequence, position) pairs for the prediction table; negative positions count from each end.

    Args:
        valid: (N, T) bool, False on right padding.
        positions: None = the last token of each sequence.
    Raises:
        UserInputError: a position outside some sequence.
    """
    lengths = valid.sum(1).tolist()
    pairs = []
    for n, length in enumerate(lengths):
        for p in (positions if positions is not None else [-1]):
            t = p if p >= 0 else length + p
            if not 0 <= t < length:
                raise UserInputError(f"prediction position {p} out of range for sequence {n} of {length} tokens")
            pairs.append((n, t))
    return pairs


@dataclass
class SweepBaseline:
    """The unablated run a sweep compares against, and what its ablated forwards start from.

    Attributes:
        logits: (N, T, V) baseline logits; distribution: their log-softmax, computed once.
        patterns: {layer: (N, H, T, T)} baseline attention (empty without patterns).
        layer_inputs: each decoder layer's input (with `reuse_prefix`; under `prefix_hooks` when
            given), where an ablation's rows join the batched forward.
        prefix: the keys/values of positions before an ablation's first one, or None.
    """

    logits: torch.Tensor
    patterns: dict[int, np.ndarray]
    distribution: BaselineDistribution
    layer_inputs: LayerInputs
    prefix: PrefixKeyValues | None


def record_baseline(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, patterns: bool,
                    reuse_prefix: bool, prefix_hooks: Callable[[], ContextManager] | None,
                    needs_prefix: bool) -> SweepBaseline:
    """One baseline forward (plus one under `prefix_hooks` when the ablated runs share edits the
    baseline lacks), recording the layer inputs and prefix keys/values the sweep reuses."""
    recorded = LayerInputs()
    record = record_layer_inputs(model, recorded) if reuse_prefix else contextlib.nullcontext()
    with record if prefix_hooks is None else contextlib.nullcontext():
        base_logits, base_attn = forward_logits(model, input_ids, attention_mask, patterns)  # (N, T, V)
    if reuse_prefix and prefix_hooks is not None:
        with prefix_hooks(), record:
            forward_logits(model, input_ids, attention_mask)
    prefix = None
    if needs_prefix:
        with prefix_hooks() if prefix_hooks is not None else contextlib.nullcontext():
            prefix = PrefixKeyValues.record(model, input_ids, attention_mask)
    return SweepBaseline(
        logits=base_logits,
        patterns={L: a.float().cpu().numpy() for L, a in enumerate(base_attn)} if patterns else {},
        distribution=BaselineDistribution.of(base_logits),
        layer_inputs=recorded,
        prefix=prefix,
    )


def run_batched_sweep(
    model: nn.Module,
    input_ids: torch.Tensor,
    ablations: Sequence[Any],
    *,
    row_hooks: RowHooks,
    first_layer: Callable[[Any], int],
    pattern_layers: Callable[[Any], Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    prediction_positions: Sequence[int] | None = None,
    tokenizer=None,
    progress: bool = True,
    reuse_prefix: bool = True,
    prefix_hooks: Callable[[], ContextManager] | None = None,
    first_position: Callable[[Any], int] | None = None,
    desc: str = "ablation",
) -> SweepRun:
    """Baseline forward, then every ablation, `batch_size` per forward.

    Args:
        model: HF causal LM (eval mode; any device/dtype).
        input_ids: (N, T) token ids; attention_mask: (N, T) 1 = token, 0 = right padding.
        ablations: anything `row_hooks`, `first_layer` and `pattern_layers` understand.
        row_hooks: (rows, T) -> context that applies rows[r] to batch row r.
        first_layer: the first decoder layer an ablation can change (where its forward may start).
        pattern_layers: the layers whose ablated attention is kept for an ablation.
        reuse_prefix: each ablation's rows join the batched forward at its own first layer, from
            the recorded input of that layer (see the module docstring).
        prefix_hooks: edits shared by every ablated run but absent from the baseline (component
            ablation's all-ones reconstruction): the layer inputs are then recorded from a
            forward under them. None = record them during the baseline forward.
        first_position: the first position an ablation edits (None = 0 for all). With
            `reuse_prefix`, a chunk runs only the positions from its smallest first position on,
            attending to the baseline's keys/values before it (`PrefixKeyValues`): an ablation
            at the last token costs one position per layer, not T.
    Returns:
        SweepRun.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserInputError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    N, T = input_ids.shape
    valid = torch.ones(N, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
    pred_pos = prediction_pairs(valid, prediction_positions)

    position_of = first_position if (first_position is not None and reuse_prefix) else (lambda a: 0)
    base = record_baseline(model, input_ids, attention_mask, patterns, reuse_prefix, prefix_hooks,
                           needs_prefix=any(position_of(a) > 0 for a in ablations))
    base_logits, baseline_patterns, baseline, recorded, prefix = (
        base.logits, base.patterns, base.distribution, base.layer_inputs, base.prefix)
    lm_head = ArchitectureAdapter.for_model(model).lm_head

    A = len(ablations)
    metrics, kl_rows, ablated_patterns, predictions = [None] * A, [None] * A, [None] * A, [None] * A
    # by first layer, so that a chunk's rows join its forward in order (see the module docstring)
    order = sorted(range(A), key=lambda j: (-position_of(ablations[j]), first_layer(ablations[j]))) if reuse_prefix else list(range(A))
    bar = tqdm(total=A, desc=desc, unit="ablation", disable=not progress)
    for i in range(0, A, batch_size):
        indices = sorted(order[i:i + batch_size], key=lambda j: first_layer(ablations[j]))  # rows join in order
        chunk = [ablations[j] for j in indices]
        rows = [a for a in chunk for _ in range(N)]  # row a*N + n: ablation a on sequence n
        offset = min(position_of(a) for a in chunk)  # positions before it are the baseline's
        with row_hooks(rows, T):
            if reuse_prefix:
                final, attn = forward_from_layers(model, recorded, [first_layer(a) for a in chunk], patterns,
                                                  offset, prefix)  # (k*N, T - offset, D)
            else:
                mask = None if attention_mask is None else attention_mask.repeat(len(chunk), 1)
                logits, attn_all = forward_logits(model, input_ids.repeat(len(chunk), 1), mask, patterns)  # (k*N, T, V)
                attn = dict(enumerate(attn_all)) if patterns else {}
        per_slice = max(1, LM_HEAD_ROWS // (N * (T - offset)))  # ablations per LM-head call
        for a, (j, ablation) in enumerate(zip(indices, chunk)):
            if reuse_prefix and a % per_slice == 0:
                with torch.no_grad():
                    logits = lm_head(final[a * N:(a + per_slice) * N]).float()  # (per_slice*N, T - offset, V)
            b = a % per_slice if reuse_prefix else a
            ablated = logits[b * N:(b + 1) * N]  # (N, T - offset, V); earlier positions: the baseline's
            m = baseline.compare(ablated, valid, offset)
            kl_rows[j] = torch.where(valid, m["kl"], torch.nan).cpu().numpy()
            metrics[j] = {name: float(m[name]) for name in
                          ("kl_divergence", "kl_max", "frac_top1_changed", "delta_logprob_top1_mean", "n_positions")}
            predictions[j] = prediction_table(base_logits, ablated, pred_pos, tokenizer, input_ids, offset=offset)
            if patterns:
                # layers this ablation's rows did not run (before its start) keep the baseline's patterns
                ablated_patterns[j] = {L: _full_pattern(attn[L][a * N:(a + 1) * N], baseline_patterns[L])
                                       if L in attn and attn[L].shape[0] >= (a + 1) * N else baseline_patterns[L]
                                       for L in pattern_layers(ablation)}
        bar.update(len(chunk))
    bar.close()

    ids_np = input_ids.cpu().numpy()
    lengths = valid.sum(1).tolist()
    return SweepRun(
        metrics=metrics,
        kl_per_position=np.stack(kl_rows) if kl_rows else np.zeros((0, N, T)),
        predictions=predictions, input_ids=ids_np, valid=valid.cpu().numpy(),
        tokens=[[token_text(tokenizer, int(i)) for i in ids_np[n, : lengths[n]]] for n in range(N)],
        baseline_patterns=baseline_patterns, ablated_patterns=ablated_patterns if patterns else [],
    )
