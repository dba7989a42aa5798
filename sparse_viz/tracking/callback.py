"""`SelectionAnalysisCallback`: record which keys the indexer selects, and how well, during training.

Every `every_n_steps` optimizer steps, before the first update (step 0) and after the last, the
callback runs the model on the datamodule's FIXED probe batch (eval mode, no_grad, the attention
of the current stage, `trace="full"`), turns the per-layer `AttentionTrace`s into the metrics of
`sparse_viz.tracking.metrics` (`analyse_probe`), and stores them in the run directory through
`RunStore` (`analysis/history.jsonl` + `analysis/step_XXXXXXX.npz`, atomic, never a step twice:
a run resumed from a checkpoint skips the steps its history already has). The scalars also go
to every Lightning logger under `selection/...`. At the end of fit it renders
`plots/*.png` and `report.html` (`sparse_viz.report.training.render_run`).

Step s of a snapshot = after s optimizer updates; its `stage` and `attention` are those of the
stage the model is in at that point (the stage of update s + 1, as `pl_module.current_stage`
reports it), so the snapshot at a stage boundary already shows the next stage's attention.

What "the selection" is at a snapshot: the keys the attention actually used (`trace.selected`)
in a sparse stage; while the stage is dense (pre-training, indexer warm-up) it is the indexer's
top-k over the causal keys, i.e. what the indexer WOULD select (`selection_source` in the
history says which).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from sparse_viz.tracking import ground_truth as GT
from sparse_viz.tracking import metrics as M
from sparse_viz.tracking.store import RunStore
from sparse_viz.tracking.token_types import TOKEN_TYPES, frequency_classes, token_type_matrix

BASELINES = ("local", "sink_local", "random", "oracle")
SCORE_BINS = 40
TOP_TOKENS = 15


def _nan_array(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float32)


def _gather(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """values (T, T) gathered at selected (T, k) (-1 -> NaN) -> (T, k)."""
    safe = selected.clamp(min=0)
    out = values.gather(-1, safe).float()
    return torch.where(selected >= 0, out, torch.full_like(out, math.nan))


def analyse_probe(
    traces: Sequence,
    k: int,
    *,
    token_types: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    previous_selected: torch.Tensor | None = None,
    baselines: dict[str, Sequence[torch.Tensor]] | None = None,
    attention: str = "sparse",
) -> tuple[dict, dict[str, np.ndarray], torch.Tensor | None]:
    """Turn one forward pass's traces on the probe into history scalars and snapshot arrays.

    Args:
        traces: one `AttentionTrace` per layer, from `model(inputs, trace="full")`.
        k: slots per query (the model's top_k, clipped to T).
        token_types: (P, T, len(TOKEN_TYPES)) bool types of the probe tokens, or None.
        token_ids: (P, T) long probe token ids (for the most selected tokens), or None.
        previous_selected: (L, P, T, k) the previous snapshot's selection, for Jaccard, or None.
        baselines: {name: [per layer (P, T, k) selection]} for the baselines' mass@k.
        attention: "dense" or "sparse", the attention the trace was taken with.

    Returns:
        (scalars, arrays, selected): scalars is a flat dict (per layer `L{i}/name`, and the mean
        over layers under `name`); arrays are the npz arrays described in `store.py` users;
        selected is the (L, P, T, k) selection (int64, -1 pads) or None if no layer selects.
    """
    n_layers = len(traces)
    first = traces[0]
    P, H, T, _ = first.dense_attn_probs.shape
    k = min(k, T)
    rows = M.informative_rows(T, k, first.dense_attn_probs.device)
    per_layer: list[dict[str, float]] = []
    selections: list[torch.Tensor | None] = []

    n_index_heads = max((t.index_head_terms.shape[1] for t in traces if t.index_head_terms is not None), default=1)
    n_types = len(TOKEN_TYPES)
    arrays = {
        "selected": np.full((n_layers, P, T, k), -1, dtype=np.int16),
        "pos_freq": _nan_array(n_layers, T),
        "dist_freq": _nan_array(n_layers, T),
        "score_hist": np.zeros((n_layers, SCORE_BINS), dtype=np.float32),
        "score_edges": _nan_array(n_layers, SCORE_BINS + 1),
        "head_spec": _nan_array(n_layers, n_index_heads),
        "head_share": _nan_array(n_layers, n_index_heads),
        "head_features": None,
        "type_share": _nan_array(n_layers, n_types),
        "type_base": _nan_array(n_layers, n_types),
        "top_token_ids": np.full((n_layers, TOP_TOKENS), -1, dtype=np.int64),
        "top_token_counts": np.zeros((n_layers, TOP_TOKENS), dtype=np.int64),
        "show_selected": np.full((n_layers, T, k), -1, dtype=np.int16),
        "show_score": _nan_array(n_layers, T, k),
        "show_attn": _nan_array(n_layers, T, k),
        "show_dense": _nan_array(n_layers, T, k),
        "show_dense_top": np.full((n_layers, T, k), -1, dtype=np.int16),
        "show_mass": _nan_array(n_layers, T),
    }
    features = []

    for layer, trace in enumerate(traces):
        dense = trace.dense_attn_probs.float()  # (P, H, T, T)
        used = trace.attn_probs.float() if trace.attn_probs is not None else dense  # (P, H, T, T)
        scores = trace.index_scores  # (P, T, T) or None
        values: dict[str, float] = {}

        if trace.selected is not None and attention == "sparse":
            selected = trace.selected.long()
        elif scores is not None:
            selected = M.topk_selection(scores, k)
        else:
            selected = None
        selections.append(selected)

        values["entropy_dense"] = float(M.attention_entropy(dense).mean())
        values["entropy_sparse"] = float(M.attention_entropy(used).mean())
        values["keys_share"] = M.keys_share(T, k if attention == "sparse" else None)
        features.append(M.head_distance_profile(dense).cpu().numpy())

        p = M.head_mean_probs(dense)  # (P, T, T)
        dense_top = M.topk_selection(p, k)  # (P, T, k)
        arrays["show_dense_top"][layer] = dense_top[0].cpu().numpy()
        if selected is not None:
            mass = M.attention_mass_at_k(dense, selected)  # (P, T)
            values["mass_at_k"] = M.mean_over_rows(mass, rows)
            values["recall_at_k"] = M.mean_over_rows(M.recall_at_k(dense, selected, k), rows)
            values["sink_share"] = M.sink_share(selected, k)
            values["local_share"] = M.local_window_share(selected, k)
            if previous_selected is not None and previous_selected.shape[0] == n_layers:
                values["jaccard_prev"] = M.mean_over_rows(
                    M.jaccard(selected, previous_selected[layer].to(selected.device), T), rows)
            arrays["selected"][layer] = selected.cpu().numpy()
            arrays["pos_freq"][layer] = M.selection_frequency_by_position(selected, k).cpu().numpy()
            arrays["dist_freq"][layer] = M.selection_frequency_by_distance(selected, k).cpu().numpy()
            arrays["show_selected"][layer] = selected[0].cpu().numpy()
            arrays["show_mass"][layer] = mass[0].cpu().numpy()
            arrays["show_dense"][layer] = _gather(p[0], selected[0]).cpu().numpy()
            arrays["show_attn"][layer] = _gather(M.head_mean_probs(used)[0], selected[0]).cpu().numpy()
            if scores is not None:
                arrays["show_score"][layer] = _gather(scores[0].float(), selected[0]).cpu().numpy()

            mask = M.selection_mask(selected, T) & rows[None, :, None]  # (P, T, T)
            if token_types is not None:
                visible = M.causal_mask(T, mask.device) & rows[:, None]  # (T, T)
                types = token_types.to(mask.device).float()  # (P, T, n_types)
                picked = mask.sum(dim=1).float()  # (P, T) selections of each key position
                seen = visible.sum(dim=0).float()[None].expand(P, T)  # (P, T) times each key is visible
                total_picked, total_seen = picked.sum(), seen.sum()
                if total_picked > 0:
                    arrays["type_share"][layer] = (torch.einsum("ps,psj->j", picked, types) / total_picked).cpu().numpy()
                    arrays["type_base"][layer] = (torch.einsum("ps,psj->j", seen, types) / total_seen).cpu().numpy()
            if token_ids is not None:
                picked = mask.sum(dim=1).reshape(-1).cpu()  # (P*T,)
                ids = token_ids.reshape(-1).cpu().long()
                if picked.sum() > 0:
                    counts = torch.zeros(int(ids.max()) + 1, dtype=torch.long).index_add_(0, ids, picked.long())
                    top = counts.topk(min(TOP_TOKENS, int((counts > 0).sum())))
                    arrays["top_token_ids"][layer, : len(top.indices)] = top.indices.numpy()
                    arrays["top_token_counts"][layer, : len(top.indices)] = top.values.numpy()

        for name, per_layer_selection in (baselines or {}).items():
            values[f"mass_at_k_{name}"] = M.mean_over_rows(
                M.attention_mass_at_k(dense, per_layer_selection[layer].to(dense.device)), rows)

        if scores is not None:
            values["indexer_kl"] = float(M.indexer_kl(dense, scores).mean())
            stats = M.index_score_statistics(scores, bins=SCORE_BINS)
            for key in ("mean", "std", "min", "max"):
                values[f"score_{key}"] = stats[key]
            arrays["score_hist"][layer] = stats["hist"].cpu().numpy()
            arrays["score_edges"][layer] = stats["edges"].cpu().numpy()
        if trace.index_head_terms is not None:
            spec = M.indexer_head_specialisation(trace.index_head_terms)
            hi = spec["specialisation"].shape[0]
            arrays["head_spec"][layer, :hi] = spec["specialisation"].cpu().numpy()
            arrays["head_share"][layer, :hi] = spec["weight_share"].cpu().numpy()
            values["head_redundancy"] = spec["redundancy"]
            values["head_specialisation"] = float(np.nanmean(spec["specialisation"].cpu().numpy()))
        per_layer.append(values)

    arrays["head_features"] = np.stack(features).astype(np.float32)  # (L, H, F)
    scalars: dict[str, float] = {}
    names = sorted({name for values in per_layer for name in values})
    for name in names:
        column = [values.get(name, math.nan) for values in per_layer]
        for layer, value in enumerate(column):
            scalars[f"L{layer}/{name}"] = float(value)
        finite = [v for v in column if v is not None and math.isfinite(v)]
        scalars[name] = float(np.mean(finite)) if finite else math.nan
    stacked = None
    if all(s is not None for s in selections):
        stacked = torch.stack([s.cpu() for s in selections])  # (L, P, T, k)
    return scalars, arrays, stacked


def snapshot_record(step: int, scalars: dict, arrays: dict[str, np.ndarray], *, stage: str, attention: str,
                    selected_by_attention: bool, token_lookup: dict[int, str], epoch: int = 0,
                    val_loss: float | None = None, val_loss_step: int | None = None,
                    tokens_per_s: float | None = None, snapshot_seconds: float | None = None) -> dict:
    """The history line of one snapshot: identification, training context and the scalars.

    `top_tokens[layer]` lists [token text, times selected] of the most selected probe tokens.
    `val_loss` is the latest validation loss known at the snapshot and `val_loss_step` the step
    it was measured at (Lightning validates after the batch's callbacks, so a validation at the
    snapshot's own step shows up at the next snapshot).
    """
    ids, counts = arrays["top_token_ids"], arrays["top_token_counts"]
    return {
        "step": int(step),
        "epoch": int(epoch),
        "stage": stage,
        "attention": attention,
        "selection_source": "attention" if selected_by_attention else "indexer_topk",
        "val_loss": val_loss,
        "val_loss_step": val_loss_step,
        "tokens_per_s": tokens_per_s,
        "snapshot_seconds": snapshot_seconds,
        **scalars,
        "top_tokens": [
            [[token_lookup.get(int(i), ""), int(c)] for i, c in zip(ids[layer], counts[layer]) if i >= 0]
            for layer in range(ids.shape[0])
        ],
    }


class SelectionAnalysisCallback(L.Callback):
    """Record selection quality and patterns on a fixed probe batch every N training steps.

    Args:
        every_n_steps: snapshot period in optimizer steps (plus step 0 and the last step).
        heatmap_layers: layers that get per-snapshot selection heatmap PNGs (None: all).
        render_every_n_snapshots: also re-render plots + report every this many snapshots
            (0: only at the end of fit).
        probe_seq_len: probe only the first N positions of each probe sequence (None: all of
            them). The model is causal, so every stored array is exactly what a forward over
            the whole sequence computes at those positions (queries and keys < N); queries at
            positions >= N are not probed. A full probe holds several (P, H, T, T) float32
            arrays per layer (dense and used attention, index head terms, their metrics), so
            its cost grows with T^2: at T = 4096 that is gigabytes and seconds per snapshot.
            `probe.json` records `probe_seq_len` and the training `train_seq_len`. (The
            `random` baseline draws its keys for the probed length, as a fresh uniform draw.)

    Requires `pl_module.model` (a `SparseTransformer`), `pl_module.model_config`,
    `pl_module.current_stage` / `pl_module.stage_attention`, and a datamodule with
    `probe_batch()`, `token_strings(ids)` and (optionally) `token_counts`. A datamodule with
    `probe_ground_truth()` (a task with ground truth, e.g. `RecallDataModule`) also gets the
    `gt_*` scalars of `sparse_viz.tracking.ground_truth` and the probe accuracy
    `answer_accuracy` in every snapshot, and its probe row 0's answers in `probe.json`.
    """

    def __init__(self, every_n_steps: int = 50, heatmap_layers: list[int] | None = None,
                 render_every_n_snapshots: int = 0, probe_seq_len: int | None = None) -> None:
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        if probe_seq_len is not None and probe_seq_len <= 0:
            raise ValueError(f"probe_seq_len must be > 0 or None, got {probe_seq_len}")
        self.probe_seq_len = probe_seq_len
        self.every_n_steps = every_n_steps
        self.heatmap_layers = heatmap_layers
        self.render_every_n_snapshots = render_every_n_snapshots
        self.store: RunStore | None = None
        self._probe: torch.Tensor | None = None
        self._types: torch.Tensor | None = None
        self._written = 0
        self._train_seconds = 0.0
        self._tokens = 0
        self._batch_start: float | None = None
        self._val_loss: float | None = None
        self._val_step: int | None = None
        self._token_lookup: dict[int, str] = {}
        self._ground_truth: torch.Tensor | None = None  # (P, T, G) of a task with ground truth
        self._targets: torch.Tensor | None = None  # (P, T)

    # ------------------------------------------------------------------ setup / resume
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.store = RunStore(trainer.default_root_dir)
        dm = trainer.datamodule
        probe = torch.as_tensor(dm.probe_batch())  # (P, T + 1)
        train_seq_len = probe.shape[1] - 1
        self._probe = probe[:, :-1].long()  # (P, T)
        self._targets = probe[:, 1:].long()  # (P, T)
        if hasattr(dm, "probe_ground_truth"):
            self._ground_truth = torch.as_tensor(dm.probe_ground_truth()["ground_truth"]).long()  # (P, T, G)
        if self.probe_seq_len is not None:  # a causal prefix: (P, N); answers there only point back into it
            self._probe = self._probe[:, : self.probe_seq_len]
            self._targets = self._targets[:, : self.probe_seq_len]
            if self._ground_truth is not None:
                self._ground_truth = self._ground_truth[:, : self.probe_seq_len]
        strings = [list(dm.token_strings(row.tolist())) for row in self._probe]
        counts = getattr(dm, "token_counts", None)
        frequent = rare = None
        if counts is not None:
            frequent, rare = frequency_classes(np.asarray(counts))
        types = [token_type_matrix(s, row.numpy(), frequent, rare) for s, row in zip(strings, self._probe)]
        self._types = torch.as_tensor(np.stack(types))  # (P, T, n_types)
        cfg = pl_module.model_config
        answers = {}
        if self._ground_truth is not None:  # [query position, key position, value position] of row 0
            rows = GT.answer_rows(self._ground_truth[:1])[0].nonzero().flatten().tolist()
            answers = {"answers": [[t, *self._ground_truth[0, t].tolist()] for t in rows]}
        self.store.write_probe({
            **answers,
            "token_ids": self._probe[0].tolist(),
            "tokens": strings[0],
            "probe_rows": int(self._probe.shape[0]),
            "seq_len": int(self._probe.shape[1]),
            "probe_seq_len": int(self._probe.shape[1]),
            "train_seq_len": int(train_seq_len),
            "top_k": int(min(cfg.top_k, self._probe.shape[1])),
            "n_layers": int(cfg.n_layers),
            "n_heads": int(cfg.n_heads),
            "selector": cfg.selector,
            "every_n_steps": self.every_n_steps,
            "token_types": list(TOKEN_TYPES),
            "run_name": Path(trainer.default_root_dir).name,
        })
        for s, row in zip(strings, self._probe.tolist()):
            for text, token in zip(s, row):
                self._token_lookup.setdefault(int(token), text)

    # ------------------------------------------------------------------ timing (tokens/s)
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self._train_seconds += time.perf_counter() - self._batch_start
            tokens = batch["tokens"] if isinstance(batch, dict) else batch
            self._tokens += int(tokens[:, :-1].numel()) if hasattr(tokens, "numel") else 0
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.snapshot(trainer, pl_module, step)

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking:
            self._val_loss, self._val_step = float(value), int(trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self.snapshot(trainer, pl_module, 0)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "interrupted", False):  # Ctrl-C: no "last step" snapshot, no render
            return
        self.snapshot(trainer, pl_module, trainer.global_step)
        if trainer.is_global_zero and self.store is not None and self.store.exists():
            self.render(trainer)

    # ------------------------------------------------------------------ the snapshot
    def snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> bool:
        """Record step `step` unless the history already has it; returns True if written."""
        if not trainer.is_global_zero or self.store is None or self.store.has_step(step):
            return False
        started = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        attention = pl_module.stage_attention
        inputs = self._probe.to(pl_module.device)
        model.eval()
        try:
            with torch.no_grad():
                out = model(inputs, attention=attention, trace="full")
                traces = out.traces
                cfg = pl_module.model_config
                T = inputs.shape[1]
                k = min(cfg.top_k, T)
                baselines = self._baselines(traces, cfg, k, T, inputs.shape[0], inputs.device)
                scalars, arrays, selected = analyse_probe(
                    traces, k, token_types=self._types, token_ids=self._probe,
                    previous_selected=self._previous_selection(step), baselines=baselines,
                    attention=attention)
                if self._ground_truth is not None:
                    scalars.update(GT.ground_truth_scalars(
                        traces, self._ground_truth.to(inputs.device),
                        list(selected) if selected is not None else None, baselines))
                    scalars["answer_accuracy"] = GT.answer_accuracy(
                        out.logits, self._targets.to(inputs.device), self._ground_truth.to(inputs.device))
        finally:
            model.train(was_training)
        stage = pl_module.current_stage
        record = snapshot_record(
            step, scalars, arrays, stage=getattr(stage, "name", str(stage)), attention=attention,
            selected_by_attention=attention == "sparse" and traces[0].selected is not None,
            token_lookup=self._token_lookup, epoch=int(trainer.current_epoch),
            val_loss=self._val_loss, val_loss_step=self._val_step,
            # this process's tokens times the number of processes (each trains a batch that size)
            tokens_per_s=self._tokens * trainer.world_size / self._train_seconds if self._train_seconds > 0 else None,
            snapshot_seconds=time.perf_counter() - started)
        written = self.store.append(record, arrays)
        self._tokens, self._train_seconds = 0, 0.0
        if not written:
            return False
        metrics = {f"selection/{name}": value for name, value in scalars.items()
                   if value is not None and math.isfinite(value)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._written += 1
        if self.render_every_n_snapshots and self._written % self.render_every_n_snapshots == 0:
            self.render(trainer)
        return True

    def _previous_selection(self, step: int) -> torch.Tensor | None:
        """(L, P, T, k) the selection of the snapshot before `step` in the run store, or None.

        Read from disk, not kept from this callback's last snapshot: the history is the source
        of truth, and the snapshot before may have been written by another process (the run
        before a resume) or another callback instance on the same run directory (the default
        config's and one added with `--trainer.callbacks+=`). A stored selection with no key at
        all is a snapshot without one (a model without indexer in a dense stage): None.
        """
        earlier = [s for s in self.store.steps() if s < step]
        if not earlier or not self.store.snapshot_path(max(earlier)).is_file():
            return None
        selected = self.store.load_snapshot(max(earlier))["selected"].astype(np.int64)
        return torch.as_tensor(selected) if (selected >= 0).any() else None

    def _baselines(self, traces, cfg, k, T, batch, device) -> dict[str, list[torch.Tensor]]:
        from sparse_viz.model.selectors import select_keys

        out: dict[str, list[torch.Tensor]] = {name: [] for name in BASELINES}
        for trace in traces:
            for name in BASELINES:
                if name == "sink_local" and not 0 <= cfg.sink_tokens < k:
                    out.pop(name, None)
                    continue
                out[name].append(select_keys(
                    name, top_k=k, seq_len=T, index_scores=trace.index_scores,
                    dense_probs=trace.dense_attn_probs, sink_tokens=cfg.sink_tokens,
                    seed=cfg.selector_seed, batch_size=batch, device=device))
        return out

    def render(self, trainer: L.Trainer) -> None:
        from sparse_viz.report.training import render_run

        render_run(Path(trainer.default_root_dir), heatmap_layers=self.heatmap_layers)
