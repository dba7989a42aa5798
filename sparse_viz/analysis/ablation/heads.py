"""Head ablation on pretrained decoder-only checkpoints (Qwen3, Qwen3-VL text, Llama family).

Definition. Ablating query head h of layer L zeroes that head's output z (the o_proj INPUT
channels `[h*hd, (h+1)*hd)`, REFERENCE §2) at all or at chosen query positions, through a
forward pre-hook on o_proj. The head still computes its attention; only its contribution to
the residual stream is removed (the TransformerLens convention). Zeroing a slice of o_proj's
OUTPUT would not be head ablation.

KV-head ablation. Ablating KV head g of layer L zeroes g's value vectors (the v_proj OUTPUT
channels `[g*hd, (g+1)*hd)`) at every key position. With GQA every query head h with
`h // (n_heads / n_kv_heads) == g` reads those values, and its z is a convex combination of
them, so its z becomes exactly 0: KV-head ablation == ablating that query-head group at all
positions. (Restricting it to positions would mean something else, so it is not offered.)

Batched sweeps (`sweep.run_batched_sweep`). The prompt batch (N sequences) is
replicated k times along the batch dim; batch row `a*N + n` carries ablation a on sequence n,
and the hooks apply a per-row keep mask, so k ablations share one forward. Each ablation's rows
start at its first layer, and an ablation confined to positions >= p runs only those positions
(the earlier ones are the baseline's at every layer): ablating at the last token costs one
position per layer.

Metrics (over ALL positions of ALL sequences, never item 0 only), with p = baseline and
q = ablated next-token distributions:
    kl_divergence       mean over positions of sum_v p (log p - log q)  (also per position)
    frac_top1_changed   share of positions whose argmax changed
    delta_logprob_top1  mean over positions of log q(t*) - log p(t*), t* = baseline's top-1
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from sparse_viz.analysis.ablation.inputs import ablation_inputs
from sparse_viz.analysis.ablation.metrics import summary_columns
from sparse_viz.analysis.ablation.sweep import SweepResult, run_batched_sweep
from sparse_viz.errors import UserInputError
from sparse_viz.pretrained.adapter import ArchitectureAdapter

# --------------------------------------------------------------------------------------------
# Model access (the few module objects the ablations need).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayout:
    """Where the attention blocks of a causal LM are and how their heads are laid out."""

    attentions: tuple[nn.Module, ...]  # one per decoder layer, each with q/k/v/o_proj
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.attentions)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def of(cls, model: nn.Module) -> AttentionLayout:
        """The layout of a HF causal LM, through the shared `ArchitectureAdapter`.

        Raises:
            UserInputError: unsupported architecture.
        """
        adapter = ArchitectureAdapter.for_model(model)
        attentions = tuple(adapter.attention(i) for i in range(adapter.n_layers))
        return cls(attentions, adapter.n_heads, adapter.n_kv_heads, adapter.head_dim)


# --------------------------------------------------------------------------------------------
# What to ablate.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadAblation:
    """One ablation: a set of heads zeroed together in one forward.

    Attributes:
        heads: (layer, query head) pairs whose z is zeroed.
        kv_heads: (layer, KV head) pairs whose values are zeroed (all positions).
        positions: query positions where the heads are zeroed; None = all positions.
        name: label used in tables and reports: "L3.H5", "L3.H5+L7.H0", "L3.all", "L3.KV1"
            (never a bare "3.5", which CSV readers would parse as a number).
        kind: "head" (one head), "heads" (several), "layer" (all heads of a layer), "kv_head".
    """

    heads: tuple[tuple[int, int], ...] = ()
    kv_heads: tuple[tuple[int, int], ...] = ()
    positions: tuple[int, ...] | None = None
    name: str = ""
    kind: str = "heads"

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads + self.kv_heads})


def head_name(layer: int, head: int) -> str:
    """Table label of one head ("L3.H5")."""
    return f"L{layer}.H{head}"


_SPEC = re.compile(r"^\s*(\d+)\s*\.\s*(\d+)\s*$")


def parse_head_spec(text: str, n_layers: int, n_heads: int, what: str = "head") -> tuple[int, int]:
    """Parse "L.H" (layer L, head H), checking both ranges.

    Raises:
        UserInputError: malformed spec or index out of range (one line naming the problem).
    """
    match = _SPEC.match(str(text))
    if not match:
        raise UserInputError(f"malformed {what} spec {text!r}: expected LAYER.{what.upper().replace(' ', '_')}, e.g. 3.5")
    layer, head = int(match.group(1)), int(match.group(2))
    if layer >= n_layers:
        raise UserInputError(f"{what} spec {text!r}: layer {layer} out of range (model has {n_layers} layers)")
    if head >= n_heads:
        raise UserInputError(f"{what} spec {text!r}: {what} {head} out of range (layer has {n_heads} {what}s)")
    return layer, head


def single_head_ablations(layout: AttentionLayout, layers: Sequence[int] | None = None,
                          positions: Sequence[int] | None = None) -> list[HeadAblation]:
    """Every query head alone (the `--sweep`), layer-major."""
    layers = range(layout.n_layers) if layers is None else layers
    pos = None if positions is None else tuple(positions)
    return [HeadAblation(heads=((L, h),), positions=pos, name=head_name(L, h), kind="head")
            for L in layers for h in range(layout.n_heads)]


def whole_layer_ablations(layout: AttentionLayout, positions: Sequence[int] | None = None) -> list[HeadAblation]:
    """All heads of each layer together (the `--sweep-layers`)."""
    pos = None if positions is None else tuple(positions)
    return [HeadAblation(heads=tuple((L, h) for h in range(layout.n_heads)), positions=pos, name=f"L{L}.all", kind="layer")
            for L in range(layout.n_layers)]


def validate_ablation(ablation: HeadAblation, layout: AttentionLayout, seq_len: int) -> None:
    """Raise UserInputError if any index of `ablation` is out of range."""
    for layer, head in ablation.heads:
        if not 0 <= layer < layout.n_layers:
            raise UserInputError(f"ablation {ablation.name}: layer {layer} out of range (model has {layout.n_layers} layers)")
        if not 0 <= head < layout.n_heads:
            raise UserInputError(f"ablation {ablation.name}: head {head} out of range (layer has {layout.n_heads} heads)")
    for layer, group in ablation.kv_heads:
        if not 0 <= layer < layout.n_layers:
            raise UserInputError(f"ablation {ablation.name}: layer {layer} out of range (model has {layout.n_layers} layers)")
        if not 0 <= group < layout.n_kv_heads:
            raise UserInputError(f"ablation {ablation.name}: KV head {group} out of range (layer has {layout.n_kv_heads} KV heads)")
    if ablation.kv_heads and ablation.positions is not None:
        raise UserInputError("KV-head ablation zeroes values at every position; --positions cannot be combined with --ablate-kv")
    for p in ablation.positions or ():
        if not -seq_len <= p < seq_len:
            raise UserInputError(f"position {p} out of range for a sequence of {seq_len} tokens")


# --------------------------------------------------------------------------------------------
# The hooks.
# --------------------------------------------------------------------------------------------


def _keep_masks(rows: Sequence[HeadAblation], layout: AttentionLayout, seq_len: int, kv: bool,
                device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Per layer, a (B, T, heads) multiplicative mask: 0 where a row ablates a head, else 1."""
    n = layout.n_kv_heads if kv else layout.n_heads
    masks: dict[int, torch.Tensor] = {}
    for row, ablation in enumerate(rows):
        pairs = ablation.kv_heads if kv else ablation.heads
        for layer, head in pairs:
            if layer not in masks:
                masks[layer] = torch.ones(len(rows), seq_len, n, device=device, dtype=dtype)  # (B, T, heads)
            if ablation.positions is None:
                masks[layer][row, :, head] = 0
            else:
                masks[layer][row, list(ablation.positions), head] = 0
    return masks


@contextlib.contextmanager
def head_ablation_hooks(model: nn.Module, rows: Sequence[HeadAblation], seq_len: int) -> Iterator[None]:
    """Apply one ablation per batch row while the context is open.

    Args:
        model: a HF causal LM (see `AttentionLayout.of`).
        rows: the ablation of each batch row (len = batch size of the forward that follows).
        seq_len: T of the forward that follows.
    """
    layout = AttentionLayout.of(model)
    param = next(model.parameters())
    head_keep = _keep_masks(rows, layout, seq_len, False, param.device, param.dtype)
    kv_keep = _keep_masks(rows, layout, seq_len, True, param.device, param.dtype)
    hd = layout.head_dim
    handles = []

    def zero_heads(keep: torch.Tensor):
        def pre_hook(module, args):
            z = args[0]  # (B, T, H*hd), head-major
            B, T, D = z.shape
            # a sweep's batch may hold only the first B rows (rows join at their own layer) and
            # only the last T positions (positions before an ablation are the baseline's): ablation_sweep
            z = (z.view(B, T, D // hd, hd) * keep[:B, -T:, :, None]).view(B, T, D)  # (B, T, H*hd)
            return (z, *args[1:])
        return pre_hook

    def zero_values(keep: torch.Tensor):
        def hook(module, args, out):
            B, T, D = out.shape  # (B, T, Hkv*hd)
            return (out.view(B, T, D // hd, hd) * keep[:B, -T:, :, None]).view(B, T, D)
        return hook

    try:
        for layer, keep in head_keep.items():
            handles.append(layout.attentions[layer].o_proj.register_forward_pre_hook(zero_heads(keep)))
        for layer, keep in kv_keep.items():
            handles.append(layout.attentions[layer].v_proj.register_forward_hook(zero_values(keep)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# The study.
# --------------------------------------------------------------------------------------------


@dataclass
class HeadAblationResult(SweepResult):
    """Everything a head-ablation run produced (see `SweepResult`; `table` as `run_head_ablation`).

    Attributes:
        ablations: the HeadAblations, in table order.
        layout: the model's AttentionLayout (n_layers, n_heads, ...).
    """

    layout: AttentionLayout | None = None


def auto_pattern_layer(ablation: HeadAblation, n_layers: int) -> int:
    """The first layer whose attention an ablation can change: the one after its deepest layer.

    (Head ablation is post-attention, so the ablated layer's own pattern never changes.)
    """
    return min(max(ablation.layers) + 1, n_layers - 1)


def head_ablation_study(
    model: nn.Module,
    input_ids: torch.Tensor,
    ablations: Sequence[HeadAblation],
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    pattern_layers: Sequence[int] | None = None,
    prediction_positions: Sequence[int] | None = None,
    tokenizer=None,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> HeadAblationResult:
    """Run the baseline and every ablation, batched, and measure the effect on the logits.

    Args:
        model: HF causal LM (eval mode; any device/dtype).
        input_ids: (N, T) token ids; attention_mask: (N, T) 1 = token, 0 = right padding.
        ablations: what to ablate; each is measured against the same baseline.
        batch_size: ablations per forward (each contributes N batch rows).
        patterns: capture attention probabilities (eager attention).
        pattern_layers: layers whose ablated patterns are kept; None = `auto_pattern_layer`.
        prediction_positions: positions for the prediction table (negative from the end of
            each sequence); None = the last token of each sequence.
        tokenizer: for token strings (optional).
        reuse_prefix: each ablation's rows join the batched forward at the first layer it
            touches, from the baseline's input of that layer (`ablation_sweep`); False = full
            forwards (the reference path). Same numbers either way (tested).
    Returns:
        HeadAblationResult.
    """
    layout = AttentionLayout.of(model)
    N, T = input_ids.shape
    for ablation in ablations:
        validate_ablation(ablation, layout, T)
    if pattern_layers is not None:
        for layer in pattern_layers:
            if not 0 <= layer < layout.n_layers:
                raise UserInputError(f"pattern layer {layer} out of range (model has {layout.n_layers} layers)")
    run = run_batched_sweep(
        model, input_ids, ablations,
        row_hooks=lambda rows, seq_len: head_ablation_hooks(model, rows, seq_len),
        first_layer=lambda a: min(a.layers),
        first_position=lambda a: 0 if a.positions is None else min(p % T for p in a.positions),
        pattern_layers=lambda a: pattern_layers if pattern_layers is not None else [auto_pattern_layer(a, layout.n_layers)],
        attention_mask=attention_mask, batch_size=batch_size, patterns=patterns,
        prediction_positions=prediction_positions, tokenizer=tokenizer, progress=progress,
        reuse_prefix=reuse_prefix, desc="head ablation")
    records = [_table_row(ablation, layout, m) for ablation, m in zip(ablations, run.metrics)]
    return HeadAblationResult(table=pd.DataFrame.from_records(records, columns=TABLE_COLUMNS),
                              ablations=list(ablations), **run.result_fields(), layout=layout)


TABLE_COLUMNS = ["ablation", "kind", "layer", "head", "n_heads_ablated", "positions", "kl_divergence",
                 "kl_max_position", "frac_top1_changed", "delta_logprob_top1", "n_positions"]


def _table_row(ablation: HeadAblation, layout: AttentionLayout, m: dict[str, float]) -> dict:
    pairs = ablation.heads + ablation.kv_heads
    layers = ablation.layers
    n_query_heads = len(ablation.heads) + len(ablation.kv_heads) * layout.group_size
    return {
        "ablation": ablation.name,
        "kind": ablation.kind,
        "layer": layers[0] if len(layers) == 1 else -1,  # -1: spans several layers
        "head": pairs[0][1] if len(pairs) == 1 else -1,  # -1: several heads (or KV group)
        "n_heads_ablated": n_query_heads,
        "positions": "all" if ablation.positions is None else " ".join(map(str, ablation.positions)),
        **summary_columns(m),
    }


def build_ablations(layout: AttentionLayout, *, ablate: Sequence[str] = (), ablate_kv: Sequence[str] = (),
                    sweep: bool = False, sweep_layers: bool = False,
                    positions: Sequence[int] | None = None) -> list[HeadAblation]:
    """Turn CLI-style specs into ablations.

    Args:
        ablate: "L.H" specs zeroed TOGETHER (one ablation).
        ablate_kv: "L.G" KV-head specs zeroed together (one ablation; with `ablate`, the same one).
        sweep: every query head alone; sweep_layers: every layer's heads together.
        positions: query positions for head ablations (None = all).
    """
    pos = None if positions is None else tuple(positions)
    out: list[HeadAblation] = []
    heads = tuple(parse_head_spec(s, layout.n_layers, layout.n_heads) for s in ablate)
    kv = tuple(parse_head_spec(s, layout.n_layers, layout.n_kv_heads, what="kv head") for s in ablate_kv)
    if len(set(heads)) != len(heads) or len(set(kv)) != len(kv):
        raise UserInputError("the same head is listed twice in --ablate / --ablate-kv")
    if heads or kv:
        name = "+".join([head_name(L, h) for L, h in heads] + [f"L{L}.KV{g}" for L, g in kv])
        kind = "kv_head" if kv and not heads and len(kv) == 1 else ("head" if len(heads) == 1 and not kv else "heads")
        out.append(HeadAblation(heads=heads, kv_heads=kv, positions=pos, name=name, kind=kind))
    if sweep:
        out += single_head_ablations(layout, positions=pos)
    if sweep_layers:
        out += whole_layer_ablations(layout, positions=pos)
    if not out:
        raise UserInputError("nothing to ablate: give --ablate L.H ..., --ablate-kv L.G, --sweep or --sweep-layers")
    return out


def run_head_ablation(
    model: nn.Module,
    prompts: str | Sequence[str] | torch.Tensor,
    *,
    tokenizer=None,
    ablate: Sequence[str] = (),
    ablate_kv: Sequence[str] = (),
    sweep: bool = False,
    sweep_layers: bool = False,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    patterns: bool = True,
    pattern_layers: Sequence[int] | None = None,
    prediction_positions: Sequence[int] | None = None,
    output_dir=None,
    overwrite: bool = False,
    progress: bool = True,
    title: str = "Head ablation",
) -> pd.DataFrame:
    """Head ablation from specs; the Python face of `python -m sparse_viz.analysis heads`.

    Args:
        model: HF causal LM, or a LoadedModel (with .model and .tokenizer).
        prompts: a prompt, several prompts (batch items, right-padded), or input_ids (N, T).
        ablate, ablate_kv, sweep, sweep_layers, positions: see `build_ablations`.
        output_dir: if given, writes head_ablation.csv, head_ablation_patterns.npz, PNGs and
            report.html there (see `sparse_viz.report.ablation.write_head_ablation_outputs`).
        overwrite: replace an earlier result of this project in `output_dir` (a new or empty
            folder needs nothing; any other folder is refused: `sparse_viz.output_dir`).
    Returns:
        DataFrame, one row per ablation: ablation, kind, layer, head (-1 = several),
        n_heads_ablated, positions, kl_divergence, kl_max_position, frac_top1_changed,
        delta_logprob_top1, n_positions.
    """
    model, tokenizer, input_ids, attention_mask = ablation_inputs(model, prompts, tokenizer)
    layout = AttentionLayout.of(model)
    ablations = build_ablations(layout, ablate=ablate, ablate_kv=ablate_kv, sweep=sweep,
                                sweep_layers=sweep_layers, positions=positions)
    result = head_ablation_study(model, input_ids, ablations, attention_mask=attention_mask, batch_size=batch_size,
                                 patterns=patterns, pattern_layers=pattern_layers,
                                 prediction_positions=prediction_positions, tokenizer=tokenizer, progress=progress)
    if output_dir is not None:
        from sparse_viz.report.ablation import write_head_ablation_outputs

        write_head_ablation_outputs(result, output_dir, title=title, overwrite=overwrite)
    return result.table
