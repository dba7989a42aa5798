"""The LightningModule that trains a `SparseTransformer` through a DSA stage schedule."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import lightning as L
import torch

from sparse_viz.errors import UserInputError
from sparse_viz.model import ModelConfig, SparseTransformer
from sparse_viz.model.cpu_features import bfloat16_emulation_warning
from sparse_viz.training.batches import answer_hits, batch_tokens, masked_cross_entropy, split_batch
from sparse_viz.training.stages import Schedule, Stage


def default_stages() -> list[Stage]:
    """dense -> warmup -> sparse: a small model has no pretrained dense checkpoint to start from.

    The main model's learning rate is flat through the dense stage and decays by a cosine
    through the sparse one, so the switch does not restart the decay.
    """
    return [
        Stage(name="dense", steps=300, lr=3e-3, indexer_lr=1e-3, warmup_steps=30, min_lr_ratio=1.0),
        Stage(name="warmup", steps=20, indexer_lr=1e-3, min_lr_ratio=1.0),
        Stage(name="sparse", steps=480, lr=3e-3, indexer_lr=5e-4, min_lr_ratio=0.1),
    ]


def stages_from_dicts(items: list[dict[str, Any]]) -> list[Stage]:
    """Build `Stage`s from config dicts; an unknown field is a `ValueError` naming it."""
    known = {field.name for field in dataclasses.fields(Stage)}
    stages = []
    for item in items:
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"unknown stage field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "name" not in item or "steps" not in item:
            raise ValueError(f"a stage needs 'name' and 'steps', got {item}")
        stages.append(Stage(**item))
    return stages


class StagedLightningModule(L.LightningModule):
    """Language-model training through a DSA stage schedule, whatever the model.

    A subclass sets `self.model` (with `forward(inputs, attention=, indexer_loss=)` returning a
    `TransformerOutput`, `main_parameters()` and `indexer_parameters()`), `self.model_config`
    and `self.schedule`, then calls `_init_training_state()`. What trains in a stage is
    `trains_main(stage)`: the main model everywhere but `warmup` here.
    """

    def _init_training_state(self) -> None:
        self._trainable_for: str | None = None
        self._batch_started_at: float | None = None
        self._val_loss_sum = 0.0
        self._val_token_count = 0
        self._val_answer_hits = 0
        self._val_answer_count = 0

    def trains_main(self, stage: Stage) -> bool:
        """Whether the main model learns (from the LM loss) in `stage`."""
        return stage.trains_main

    # ----------------------------------------------------------------- the schedule's view
    @property
    def current_stage(self) -> Stage:
        return self.schedule.locate(self.global_step)[1]

    @property
    def stage_attention(self) -> str:
        """`dense` or `sparse`: the attention the current stage trains and validates with."""
        return self.current_stage.attention

    def _indexer_loss_mode(self, stage: Stage) -> str | None:
        return stage.indexer_loss if self.model_config.use_indexer else None

    def _set_trainable(self, stage: Stage) -> None:
        """Freeze the main model where it does not learn: no graph is built through it."""
        if self._trainable_for == stage.name:
            return
        for parameter in self.model.main_parameters():
            parameter.requires_grad_(self.trains_main(stage))
        self._trainable_for = stage.name

    def on_fit_start(self) -> None:
        """Say once, before the first step, when bfloat16 was asked of a CPU that emulates it: the
        run is then several times slower than in float32, which a user following the README's
        bf16 advice would not expect."""
        if self.device.type == "cpu" and str(self.trainer.precision).startswith("bf16") and self.trainer.is_global_zero:
            warning = bfloat16_emulation_warning()
            if warning is not None:
                print(f"{warning}; --trainer.precision 32-true is likely faster on this machine", file=sys.stderr)

    # ----------------------------------------------------------------- steps
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._batch_started_at = time.perf_counter()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One step of the current stage.

        Args:
            batch: (B, T + 1) token ids; inputs are batch[:, :-1], targets batch[:, 1:]. Or a
                dict with `tokens` (B, T + 1) and `loss_mask` (B, T) bool: the LM loss counts only
                at the masked positions (`sparse_viz.training.batches`).
        """
        stage_index, stage, _ = self.schedule.locate(self.global_step)
        self._set_trainable(stage)
        inputs, targets, loss_mask = split_batch(batch)  # (B, T), (B, T), (B, T) or None
        out = self.model(inputs, attention=stage.attention, indexer_loss=self._indexer_loss_mode(stage))
        lm_loss, _ = masked_cross_entropy(out.logits, targets, loss_mask)
        loss = lm_loss if self.trains_main(stage) else lm_loss.new_zeros(())
        if out.indexer_kl is not None:
            if not torch.isfinite(out.indexer_kl).all():
                raise FloatingPointError(f"indexer KL is not finite: {out.indexer_kl.tolist()}")
            loss = loss + self.hparams.indexer_loss_weight * out.indexer_kl.sum()
            for layer, kl in enumerate(out.indexer_kl.detach()):
                self.log(f"train/indexer_kl/layer_{layer}", kl)
            self.log("train/indexer_kl", out.indexer_kl.detach().mean())
        self.log("train/loss", lm_loss.detach(), prog_bar=True)
        self.log("train/stage", float(stage_index))
        main_lr, indexer_lr = self.schedule.learning_rates(self.global_step)
        self.log("train/lr_main", main_lr)
        self.log("train/lr_indexer", indexer_lr)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._batch_started_at is not None:
            elapsed = time.perf_counter() - self._batch_started_at
            # Every process trains a batch of the same size in about the same time: the run's
            # throughput is this process's times the number of processes (no collective needed).
            tokens = batch_tokens(batch) * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = 0.0
        self._val_token_count = 0
        self._val_answer_hits = 0
        self._val_answer_count = 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Validation LM loss with the attention the current stage uses (on the masked
        positions only for a masked batch, which also counts the answer accuracy)."""
        inputs, targets, loss_mask = split_batch(batch)
        out = self.model(inputs, attention=self.stage_attention)
        loss, count = masked_cross_entropy(out.logits, targets, loss_mask, reduction="sum")
        self._val_loss_sum += loss.item()
        self._val_token_count += count
        if loss_mask is not None:
            hits, answers = answer_hits(out.logits, targets, loss_mask)
            self._val_answer_hits += hits
            self._val_answer_count += answers
        return loss / max(count, 1)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over every rank's batches (identity on a single device).
        totals = torch.tensor([self._val_loss_sum, float(self._val_token_count)], dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, token_count = totals.tolist()
        if not token_count:
            return
        mean_loss = loss_sum / token_count
        self.log("val/loss", mean_loss, prog_bar=True)
        self.log("val/ppl", math.exp(min(mean_loss, 50.0)))
        self.log("val/stage", float(self.schedule.locate(self.global_step)[0]))
        if self._val_answer_count:
            answers = torch.tensor([float(self._val_answer_hits), float(self._val_answer_count)],
                                   dtype=torch.float64, device=self.device)
            hits, count = self.trainer.strategy.reduce(answers, reduce_op="sum").tolist()
            self.log("val/accuracy", hits / count, prog_bar=True)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        """AdamW with separate main / indexer parameter groups and per-stage learning rates.

        Base learning rates are 1.0 so that `LambdaLR` factors are the absolute rates the
        schedule gives; matrices get weight decay, vectors (norms, biases) do not.
        """
        groups, roles = [], []
        for role, parameters in (("main", self.model.main_parameters()), ("indexer", self.model.indexer_parameters())):
            parameters = list(parameters)
            decay = [p for p in parameters if p.ndim >= 2]
            no_decay = [p for p in parameters if p.ndim < 2]
            for params, wd in ((decay, self.hparams.weight_decay), (no_decay, 0.0)):
                if params:
                    groups.append({"params": params, "lr": 1.0, "weight_decay": wd})
                    roles.append(role)
        optimizer = torch.optim.AdamW(groups, lr=1.0, betas=tuple(self.hparams.betas))
        schedule = self.schedule

        def rate(role: str):
            index = 0 if role == "main" else 1
            return lambda step: schedule.learning_rates(step)[index]

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [rate(role) for role in roles])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DSALightningModule(StagedLightningModule):
    """Language-model training with DeepSeek Sparse Attention and a stage schedule.

    The `--model.*` options of `python -m sparse_viz.train` are this constructor's arguments:
    the `ModelConfig` fields (their descriptions below are copied from `ModelConfig`'s docstring
    at import, so `--help` documents every option from one source) plus the training recipe.
    `vocab_size` is linked to the data's tokenizer by the training command.

    Args:
        {model_config_args}
        stages: the schedule, a list of `Stage` fields as dicts (`{name: dense, steps: 300,
            lr: 3e-3, ...}`); default dense -> warmup -> sparse. `[{name: sparse, ...}]` alone
            is the from-scratch mode. Plain dicts (not dataclasses) so that a config or command
            line that gives `stages` replaces the whole list instead of merging item by item.
        weight_decay: AdamW decoupled weight decay on matrices (embeddings included), not on
            vectors (norm scales, biases).
        betas: AdamW betas.
        indexer_loss_weight: multiplier of the summed per-layer indexer KL. The indexer's input
            is detached, so this only rescales the indexer's gradient.
    """

    def __init__(
        self,
        vocab_size: int = 2048,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        d_ff: int = 384,
        max_seq_len: int = 256,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        short_conv: int = 0,
        selector: str = "topk",
        top_k: int = 32,
        sink_tokens: int = 4,
        selector_seed: int = 0,
        use_indexer: bool = True,
        indexer_heads: int = 4,
        indexer_dim: int = 32,
        indexer_rope_dim: int = 16,
        indexer_norm_eps: float = 1e-6,
        attention_path: str = "gathered",
        indexer_path: str = "blockwise",
        indexer_block_size: int = 256,
        stages: list[dict[str, Any]] | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        indexer_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        try:
            self.model_config = ModelConfig(
                vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=rope_theta,
                tie_embeddings=tie_embeddings, norm_eps=norm_eps, short_conv=short_conv, selector=selector, top_k=top_k,
                sink_tokens=sink_tokens, selector_seed=selector_seed, use_indexer=use_indexer,
                indexer_heads=indexer_heads, indexer_dim=indexer_dim,
                indexer_rope_dim=indexer_rope_dim,
                indexer_norm_eps=indexer_norm_eps, attention_path=attention_path,
                indexer_path=indexer_path, indexer_block_size=indexer_block_size,
            )
            self.schedule = Schedule(stages_from_dicts(stages) if stages is not None else default_stages())
        except ValueError as error:
            raise UserInputError(str(error)) from None
        if not use_indexer and any(s.name == "warmup" for s in self.schedule.stages):
            raise UserInputError("a 'warmup' stage trains the indexer: it needs use_indexer=True")
        self.model = SparseTransformer(self.model_config)
        self._init_training_state()


def _model_config_args() -> str:
    """The `name: description` items of `ModelConfig`'s docstring (8-space indented lines)."""
    lines = [line for line in (ModelConfig.__doc__ or "").splitlines() if line.startswith(" " * 8)]
    return "\n".join(lines).strip()


DSALightningModule.__doc__ = (DSALightningModule.__doc__ or "").replace("{model_config_args}", _model_config_args())
