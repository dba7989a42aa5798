"""`python -m sparse_viz.train`: train a DSA transformer with LightningCLI conventions.

    python -m sparse_viz.train                                   # the embedded default
    python -m sparse_viz.train --config configs/train/dense.yaml --trainer.max_steps=200
    python -m sparse_viz.train --model.top_k=16 --data.corpus=path/to/texts/
    python -m sparse_viz.train --ckpt_path results/<run>/checkpoints/last.ckpt   # resume
    python -m sparse_viz.train --config configs/train/recall.yaml              # associative recall
    python -m sparse_viz.train --data sparse_viz.data.RecallDataModule --data.num_pairs=16

`--model` and `--data` are class paths (LightningCLI's subclass mode): the model is
`sparse_viz.training.DSALightningModule` (the default: the project's own DSA transformer) or
`sparse_viz.training.RetrofitLightningModule` (Lightning Indexers on a frozen pretrained model,
configs/train/retrofit_smollm2.yaml); the data `sparse_viz.data.TextDataModule` (the default) or
`sparse_viz.data.RecallDataModule`. `--model.<option>` / `--data.<option>` set that class's options.

Each run gets its own directory `<run_root>/<run_name>/` (default `results/<config>-<time>/`)
with the resolved `config.yaml`, `checkpoints/`, `metrics.csv`, and what the callbacks write.
A resumed run continues in the directory its checkpoint lives in. Bad input (unknown option,
malformed YAML, unknown selector, missing corpus, ...) is one line on stderr, exit status 2, and
no run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import datasets
import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sparse_viz.data import TextDataModule
from sparse_viz.data.tokenizer import save_tokenizer_atomic
from sparse_viz.errors import UserInputError
from sparse_viz.model import ModelConfig
from sparse_viz.training import Schedule
from sparse_viz.training.module import stages_from_dicts
from sparse_viz.training.progress import use_steps_progress_bar
from sparse_viz.training.quiet import silence_third_party_notices
from sparse_viz.training.resumable_csv_logger import ResumableCSVLogger

MODEL_CONFIG_FIELDS = [field.name for field in dataclasses.fields(ModelConfig)]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def prepared_vocab_size(datamodule: L.LightningDataModule) -> int:
    """Prepare the data (train or load the tokenizer) and return the real vocabulary size."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.vocab_size


class SparseVizCLI(LightningCLI):
    """LightningCLI without subcommands, with a run directory per run and one-line errors."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_root", type=str, default="results", help="Where run directories are made.")
        parser.add_argument("--run_name", type=str | None, default=None, help="Default: <config>-<time>.")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to resume from.")
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=prepared_vocab_size,
                              apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check everything that is cheap to check before any seed, data or model work."""
        super().parse_arguments(parser, args)
        model = self.config.model.get("init_args", self.config.model)  # subclass mode: {class_path, init_args}
        try:
            stages = stages_from_dicts(model.stages) if model.get("stages") is not None else None
            if stages is not None:
                Schedule(stages)
            if self.config.model.get("class_path", "").endswith("DSALightningModule"):
                ModelConfig(**{k: model[k] for k in MODEL_CONFIG_FIELDS if k in model})
        except ValueError as error:
            raise UserInputError(str(error)) from None
        data = self.config.data
        data_args = data.get("init_args", data)
        seq_len = data_args.get("seq_len")
        if seq_len is not None and model.get("max_seq_len") is not None and seq_len > model.max_seq_len:
            raise UserInputError(
                f"data.seq_len={seq_len} is larger than model.max_seq_len={model.max_seq_len}"
            )

    def before_instantiate_classes(self) -> None:
        self.run_dir = self._choose_run_dir()
        self.config.trainer.default_root_dir = str(self.run_dir)

    def _choose_run_dir(self) -> Path:
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path:
            ckpt = Path(ckpt_path)
            if not ckpt.is_file():
                raise UserInputError(f"checkpoint not found: {ckpt}")
            if ckpt.parent.name == "checkpoints" and self.config.get("run_name") is None:
                return ckpt.parent.parent
        root = Path(self.config.run_root)
        if self.config.get("run_name"):
            return root / self.config.run_name
        configs = self.config.get("config") or []
        stem = Path(str(configs[-1])).stem if configs else "default"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        candidate, suffix = root / name, 1
        while candidate.exists():
            suffix += 1
            candidate = root / f"{name}-{suffix}"
        return candidate

    def instantiate_trainer(self, **kwargs):
        kwargs.setdefault("logger", self._loggers())
        trainer = super().instantiate_trainer(**kwargs)
        use_steps_progress_bar(trainer)
        trainer.callbacks.append(
            ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_last=True, save_top_k=0,
                            every_n_train_steps=trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else None)
        )
        return trainer

    def _resume_step(self) -> int | None:
        ckpt_path = self.config.get("ckpt_path")
        if not ckpt_path:
            return None
        return int(torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step", 0))

    def _loggers(self):
        loggers = [ResumableCSVLogger(save_dir=str(self.run_dir.parent), name=self.run_dir.name, version="",
                                      resume_step=self._resume_step())]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(self.run_dir), name="tensorboard", version=""))
        except (ImportError, ModuleNotFoundError):
            pass
        return loggers

    def after_instantiate_classes(self) -> None:
        if self.trainer.max_steps == -1:
            self.trainer.fit_loop.epoch_loop.max_steps = self.model.schedule.total_steps


def run_training(args: list[str] | None = None) -> SparseVizCLI:
    """Parse `args` (default: the command line), train, and return the CLI (model, data, run_dir)."""
    silence_third_party_notices()
    cli = SparseVizCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else [],
            "exit_on_error": False,
        },
        args=args,
    )
    if cli.trainer.is_global_zero:
        # The run directory is self-contained: analyses of its checkpoints read their tokenizer here.
        cli.run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(cli.datamodule, TextDataModule):
            save_tokenizer_atomic(cli.datamodule.tokenizer, cli.run_dir / "tokenizer.json")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    print(f"run directory: {cli.run_dir}")
    return cli


def user_error_in_chain(error: BaseException) -> BaseException | None:
    """The user-input error behind `error`, if any: jsonargparse wraps errors raised while it
    instantiates classes (e.g. a missing corpus found by the data link) in its own ValueError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (UserInputError, ArgumentError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) < 400 else text[:397] + "..."


if __name__ == "__main__":
    # Keep stderr for what matters: errors are one line, and progress is Lightning's own bar.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    try:
        run_training()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the user's input
        cause = user_error_in_chain(error)
        if cause is None:
            raise
        print(f"sparse_viz.train: error: {_one_line(cause)}", file=sys.stderr)
        sys.exit(2)
