"""Retrofit DSA onto a pretrained checkpoint: train Lightning Indexers on a frozen Hugging Face model.

DeepSeek-V3.2-Exp's recipe (tech report §2.1) on a model someone already has: a dense warm-up
that trains only the indexers against the frozen model's attention, then (optionally) a sparse
stage where the model attends to each layer's top-k keys and the indexers learn on the selected
set. `python -m sparse_viz.train --config configs/train/retrofit_smollm2.yaml` runs it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sparse_viz.errors import UserInputError
from sparse_viz.model import ModelConfig
from sparse_viz.training.batches import masked_cross_entropy, split_batch
from sparse_viz.training.module import StagedLightningModule, stages_from_dicts
from sparse_viz.training.stages import Schedule, Stage

RETROFIT_STAGES = ("warmup", "sparse")


def default_retrofit_stages() -> list[dict[str, Any]]:
    """A warm-up only: the indexers learn the frozen model's attention (sparse inference after)."""
    return [{"name": "warmup", "steps": 300, "indexer_lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1}]


class RetrofitLightningModule(StagedLightningModule):
    """Lightning Indexers trained on a frozen pretrained causal LM (Qwen3, Qwen2, Llama, Mistral).

    Checkpoints hold the indexers only (plus the optimizer's state for them) and the identity of
    the model they belong to (path and fingerprint); with `finetune_model` the model's weights
    change and are saved too.

    Args:
        model_path: a local Hugging Face model directory (the tokenizer the data uses should be
            its `tokenizer.json`).
        vocab_size: linked to the data's tokenizer by the training command; must fit the model's
            embedding.
        top_k: keys per query in sparse attention (the sparse stage, the probe, validation).
        indexer_heads: indexer heads H_I per layer.
        indexer_dim: indexer head dim d_I.
        indexer_rope_dim: leading dims of q_I / k_I that get RoPE (even, <= indexer_dim).
        indexer_rope_theta: RoPE base of those dims; None = the model's own.
        indexer_block_size: queries per block of the indexer's top-k and warm-up KL.
        warmup_kl: how the warm-up KL is computed: "blocks" (default), "full" or "checkpointed"
            (the least memory, for long sequences); see `RetrofitModel`.
        sink_tokens: sinks of the `sink_local` baseline the tracking callback compares with.
        stages: `warmup` and/or `sparse` stages as dicts (see `Stage`); default a 300-step warm-up.
        finetune_model: in `sparse` stages, also train the model's own weights with the LM loss
            (default False: the model stays frozen, only the indexers learn).
        dtype: the model's dtype while training ("float32" or "bfloat16").
        weight_decay, betas: AdamW settings (weight decay on matrices only).
        indexer_loss_weight: multiplier of the summed per-layer indexer KL.
    """

    def __init__(
        self,
        model_path: str = ".cache/smollm2-135m",
        vocab_size: int | None = None,
        top_k: int = 64,
        indexer_heads: int = 4,
        indexer_dim: int = 64,
        indexer_rope_dim: int = 32,
        indexer_rope_theta: float | None = None,
        indexer_block_size: int = 256,
        warmup_kl: str = "blocks",
        sink_tokens: int = 4,
        stages: list[dict[str, Any]] | None = None,
        finetune_model: bool = False,
        dtype: str = "float32",
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        indexer_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        from sparse_viz.pretrained.loading import load_model
        from sparse_viz.pretrained.retrofit_indexers import RetrofitIndexers, model_fingerprint
        from sparse_viz.pretrained.retrofit_model import RetrofitModel

        try:
            self.schedule = Schedule(stages_from_dicts(stages if stages is not None else default_retrofit_stages()))
        except ValueError as error:
            raise UserInputError(str(error)) from None
        wrong = [s.name for s in self.schedule.stages if s.name not in RETROFIT_STAGES]
        if wrong:
            raise UserInputError(f"a retrofit run has warmup and sparse stages only, got {', '.join(wrong)}")
        if top_k < 1:
            raise UserInputError(f"top_k must be >= 1, got {top_k}")
        if not Path(model_path).is_dir():
            hint = " (scripts/setup.sh --dev converts SmolLM2-135M there)" if "smollm2" in str(model_path) else ""
            raise UserInputError(f"model directory {model_path!r} does not exist{hint}")
        loaded = load_model(model_path, device="cpu", dtype=dtype, attn_implementation="sdpa")
        adapter = loaded.adapter
        model_vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
        if vocab_size is not None and vocab_size > model_vocab:
            raise UserInputError(f"the data's tokenizer has {vocab_size} tokens, the model at {model_path!r} embeds "
                                 f"{model_vocab}: use the model's own tokenizer (data.tokenizer_path)")
        indexers = RetrofitIndexers.for_model(adapter, indexer_heads, indexer_dim, indexer_rope_dim, indexer_rope_theta)
        self.model = RetrofitModel(loaded.model, indexers, top_k=top_k, block_size=indexer_block_size,
                                   warmup_kl=warmup_kl)
        self.model_identity = {"model_path": str(model_path), "model_fingerprint": model_fingerprint(model_path),
                               "indexer_settings": dict(indexers.settings)}
        n_heads = adapter.n_heads if adapter.hidden_size % adapter.n_heads == 0 else 1
        try:  # what the tracking callback reads (sizes, k, baselines' settings)
            self.model_config = ModelConfig(
                vocab_size=model_vocab, d_model=adapter.hidden_size, n_layers=adapter.n_layers, n_heads=n_heads,
                max_seq_len=adapter.max_positions or 1 << 20, selector="topk", top_k=top_k, sink_tokens=sink_tokens,
                indexer_heads=indexer_heads, indexer_dim=indexer_dim, indexer_rope_dim=indexer_rope_dim,
                indexer_block_size=indexer_block_size)
        except ValueError as error:
            raise UserInputError(str(error)) from None
        for parameter in self.model.main_parameters():
            parameter.requires_grad_(False)
        self.indexer_parameter_count = indexers.parameter_count()
        self.hparams["indexer_parameters"] = self.indexer_parameter_count
        model_parameters = sum(p.numel() for p in self.model.main_parameters())
        print(f"retrofit: {adapter.n_layers} Lightning Indexers ({indexer_heads} heads x {indexer_dim}, RoPE on "
              f"{indexer_rope_dim} dims, base {indexers.settings['rope_theta']:g}) = {self.indexer_parameter_count:,} "
              f"parameters on {model_parameters:,} {'trained' if finetune_model else 'frozen'} model parameters "
              f"({model_path})")
        # The frozen weights are not in the checkpoint: Lightning must not require them on load.
        self.strict_loading = False
        self._init_training_state()
        self._val_sparse_loss_sum = 0.0

    def trains_main(self, stage: Stage) -> bool:
        return stage.name == "sparse" and self.hparams.finetune_model

    def train(self, mode: bool = True) -> RetrofitLightningModule:
        """Lightning switches modules to train mode; a frozen model stays in eval mode."""
        super().train(mode)
        if not self.hparams.finetune_model:
            self.model.hf.eval()
        return self

    def on_train_start(self) -> None:
        for logger in self.loggers:
            logger.log_metrics({"indexer_parameters": float(self.indexer_parameter_count)}, step=self.global_step)

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_sparse_loss_sum = 0.0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The stage's LM loss (the base's), plus in `warmup` the loss with the indexers' top-k
        attention (`val/sparse_loss`): how well the retrofit would run sparse right now."""
        loss = super().validation_step(batch, batch_idx)
        if self.stage_attention == "dense":
            inputs, targets, loss_mask = split_batch(batch)
            out = self.model(inputs, attention="sparse")
            sparse_loss, _ = masked_cross_entropy(out.logits, targets, loss_mask, reduction="sum")
            self._val_sparse_loss_sum += sparse_loss.item()
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.stage_attention != "dense":
            return
        totals = torch.tensor([self._val_sparse_loss_sum, float(self._val_token_count)], dtype=torch.float64,
                              device=self.device)
        loss_sum, token_count = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        if token_count:
            self.log("val/sparse_loss", loss_sum / token_count)
            self.log("val/sparse_ppl", math.exp(min(loss_sum / token_count, 50.0)))

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the indexers' tensors only (the model's too when it is fine-tuned), and say
        which model they belong to."""
        if not self.hparams.finetune_model:
            checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                        if not key.startswith("model.hf.")}
        checkpoint["retrofit"] = dict(self.model_identity)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse indexers trained for another model; require every indexer tensor."""
        from sparse_viz.pretrained.retrofit_indexers import check_same_model

        check_same_model(checkpoint, "the checkpoint", self.model_identity["model_path"],
                         self.model_identity["model_fingerprint"])
        wanted = {key for key in self.state_dict() if key.startswith("model.indexers.")}
        missing = sorted(wanted - set(checkpoint["state_dict"]))
        if missing:
            raise UserInputError(f"the checkpoint lacks {len(missing)} indexer tensor(s), e.g. {missing[0]}")
