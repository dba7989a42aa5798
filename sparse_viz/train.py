"""`python -m sparse_viz.train`: train a DSA transformer with LightningCLI conventions.

    python -m sparse_viz.train                                   # the embedded default
    python -m sparse_viz.train --config configs/train/dense.yaml --trainer.max_steps=200
    python -m sparse_viz.train --model.top_k=16 --data.corpus=path/to/texts/
    python -m sparse_viz.train --ckpt_path results/<run>/checkpoints/last.ckpt   # resume

Each run gets its own directory `<run_root>/<run_name>/` (default `results/<config>-<time>/`)
with the resolved `config.yaml`, `checkpoints/`, `metrics.csv`, and what the callbacks write.
A resumed run continues in the directory its checkpoint lives in. Bad input (unknown option,
malformed YAML, unknown selector, missing corpus, ...) is one line on stderr, exit status 2, and
no run directory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from sparse_viz.data import TextDataModule
from sparse_viz.errors import UserInputError
from sparse_viz.training import DSALightningModule

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "train"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def prepared_vocab_size(datamodule: TextDataModule) -> int:
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
        parser.link_arguments("data", "model.vocab_size", compute_fn=prepared_vocab_size, apply_on="instantiate")

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
        trainer.callbacks.append(
            ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_last=True, save_top_k=0,
                            every_n_train_steps=trainer.val_check_interval if isinstance(trainer.val_check_interval, int) else None)
        )
        return trainer

    def _loggers(self):
        loggers = [CSVLogger(save_dir=str(self.run_dir.parent), name=self.run_dir.name, version="")]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(self.run_dir), name="tensorboard", version=""))
        except (ImportError, ModuleNotFoundError):
            pass
        return loggers

    def after_instantiate_classes(self) -> None:
        seq_len = self.datamodule.hparams.seq_len
        max_seq_len = self.model.model_config.max_seq_len
        if seq_len > max_seq_len:
            raise UserInputError(f"data.seq_len={seq_len} is larger than model.max_seq_len={max_seq_len}")
        if self.trainer.max_steps == -1:
            self.trainer.fit_loop.max_steps = self.model.schedule.total_steps


def main(args: list[str] | None = None) -> Path:
    """Parse, train, and return the run directory."""
    cli = SparseVizCLI(
        DSALightningModule,
        TextDataModule,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else [],
            "exit_on_error": False,
        },
        args=args,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    print(f"run directory: {cli.run_dir}")
    return cli.run_dir


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) < 400 else text[:397] + "..."


if __name__ == "__main__":
    try:
        main()
    except (UserInputError, ArgumentError) as error:
        print(f"sparse_viz.train: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
