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
A new run refuses a `--run_name` whose directory holds anything already (an earlier run, or any
folder): it would write over it.
A resumed run continues in the directory its checkpoint lives in, exactly where it stopped
(`sparse_viz.training.checkpointing`: `last.ckpt` every `--checkpoint_every_n_steps` steps and on
Ctrl-C / SIGTERM, after which the resume command is printed and the exit status is 130 / 143). Bad input (unknown option,
malformed YAML, unknown selector, missing corpus, ...) is one line on stderr, exit status 2, and
no run directory.

`--help` (every option, the default model's and data module's included) and a misspelled option
(one line naming the nearest valid ones) are answered in a fraction of a second, before torch and
Lightning are imported, from the real parser's help kept in train_help_snapshot.py
(`sparse_viz.train_help`; `write_help_snapshot()` below rewrites it).
"""

from __future__ import annotations

import sys

from sparse_viz import train_help

if __name__ == "__main__":
    # `--help` and a misspelled option are answered here, before torch and Lightning are imported
    # (5-30 s on a CPU machine), from the real parser's help texts kept by train_help; it returns
    # when they are stale or the command line is anything else.
    train_help.answer_without_lightning(sys.argv[1:])

# The imports that take the time come after that early answer (so below a statement, on purpose).
import contextlib
import dataclasses
import importlib
import io
import logging
import os
import pprint
import re
import textwrap
import time
from pathlib import Path

import datasets
import lightning as L
import torch
from jsonargparse import ArgumentError
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sparse_viz.data import TextDataModule
from sparse_viz.data.tokenizer import save_tokenizer_atomic
from sparse_viz.errors import UserInputError
from sparse_viz.model import ModelConfig
from sparse_viz.training import Schedule
from sparse_viz.training.class_choices import class_choices, unknown_class_error
from sparse_viz.training.checkpointing import TrainingInterrupted, use_step_checkpoint
from sparse_viz.training.module import default_stages, stages_from_dicts
from sparse_viz.training.progress import use_steps_progress_bar
from sparse_viz.training.quiet import silence_third_party_notices
from sparse_viz.training.resumable_csv_logger import ResumableCSVLogger
from sparse_viz.training.retrofit_module import default_retrofit_stages

MODEL_CONFIG_FIELDS = [field.name for field in dataclasses.fields(ModelConfig)]

DEFAULT_CONFIG = train_help.DEFAULT_CONFIG  # configs/train/default.yaml of this checkout
# Set by rank 0 for the processes Lightning's DDP launcher starts (they inherit its environment),
# so that every process writes to the run directory rank 0 chose (a name with the time in it
# would differ). Processes started by an external launcher (torchrun, SLURM) need --run_name.
RUN_DIR_ENV = "SPARSE_VIZ_RUN_DIR"


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
        parser.add_argument("--checkpoint_every_n_steps", type=PositiveInt, default=50,
                            help="Steps between writes of <run>/checkpoints/last.ckpt (also written at the end "
                                 "and on Ctrl-C / SIGTERM), independent of validation.")
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=prepared_vocab_size,
                              apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check everything that is cheap to check before any seed, data or model work."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            given = sys.argv[1:] if args is None else [arg for arg in args if isinstance(arg, str)]
            line = unknown_class_error(str(error)) or unknown_option_error(parser, str(error), given)
            if line is None:
                raise
            raise UserInputError(line) from None
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
        warning = dense_sparse_stage_warning(self.config.model.get("class_path", ""), model, seq_len)
        if warning and RUN_DIR_ENV not in os.environ and launched_as_global_rank_zero():  # once, not per process
            print(f"sparse_viz.train: warning: {warning}", file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        self.run_dir = self._choose_run_dir()
        self.config.trainer.default_root_dir = str(self.run_dir)

    def _choose_run_dir(self) -> Path:
        if RUN_DIR_ENV in os.environ:
            # A process Lightning started for another device: rank 0 chose the directory.
            return Path(os.environ[RUN_DIR_ENV])
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path:
            ckpt = Path(ckpt_path)
            if not ckpt.is_file():
                raise UserInputError(f"checkpoint not found: {ckpt}")
            if ckpt.parent.name == "checkpoints" and self.config.get("run_name") is None:
                return ckpt.parent.parent
        root = Path(self.config.run_root)
        if self.config.get("run_name"):
            run_dir = root / self.config.run_name
            if not ckpt_path and launched_as_global_rank_zero():
                refuse_a_used_run_dir(run_dir)
            return run_dir
        launched = max(int(os.environ.get(name, "1") or 1) for name in ("WORLD_SIZE", "SLURM_NTASKS"))
        if launched > 1:
            # Each process would name a directory after its own clock; nothing can agree on one yet.
            raise UserInputError(f"{launched} processes started by a cluster launcher (WORLD_SIZE / SLURM_NTASKS): "
                                 "give --run_name so that they all write to one run directory")
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
        use_step_checkpoint(trainer, self.run_dir / "checkpoints", self.config.checkpoint_every_n_steps)
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


def dense_sparse_stage_warning(class_path: str, model: dict, seq_len: int | None) -> str | None:
    """The warning for a sparse stage that cannot be sparse, or None.

    Query t attends to min(t + 1, top_k) keys, so with top_k >= seq_len (the T the model sees;
    a curriculum's shorter phases are shorter still) every query keeps all its past keys: the
    "sparse" stage trains dense attention under a sparse name. It is a warning, not an error:
    the same run is a legitimate control (the sparse code path against dense attention).

    Args:
        class_path: the model's class path (its default stages, when `stages` is not given).
        model: the model's options (`init_args`); a model without `selector` selects top-k.
        seq_len: the data module's `seq_len`, or None if it has none.
    """
    top_k, selector = model.get("top_k"), model.get("selector", "topk")
    if top_k is None or seq_len is None or selector == "dense" or top_k < seq_len:
        return None
    stages = model.get("stages")
    if stages is None:
        if class_path.endswith("DSALightningModule"):
            stages = [dataclasses.asdict(stage) for stage in default_stages()]
        elif class_path.endswith("RetrofitLightningModule"):
            stages = default_retrofit_stages()
        else:
            return None  # another class's defaults are unknown here
    if not any(stage.get("name") == "sparse" for stage in stages):
        return None
    return (f"model.top_k={top_k} >= data.seq_len={seq_len}: every query attends to all its past keys, so the "
            f"sparse stage (selector {selector}) is dense attention; give model.top_k < data.seq_len to train "
            "sparse attention")


def launched_as_global_rank_zero() -> bool:
    """Whether no cluster launcher started this process as another rank than 0 (torchrun sets
    RANK, SLURM SLURM_PROCID; a process started by hand has neither).

    Every process of an external launcher parses the same command line with the same --run_name,
    and rank 0 makes the run directory while the others may still be parsing: only rank 0 can
    tell a used directory from the one its own run has just made.
    """
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "SLURM_PROCID"))


def refuse_a_used_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run in `run_dir` if something is there already.

    A new run writes metrics.csv, checkpoints/last.ckpt, analysis/ and the report over whatever
    the directory holds (an earlier run of the same --run_name, or any folder a mistyped
    --run_root / --run_name points at). An empty directory is fine (made beforehand on purpose);
    a resume (--ckpt_path) is never refused.

    Raises:
        UserInputError: naming the directory and what to do instead.
    """
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    if not run_dir.is_dir():
        raise UserInputError(f"run directory {run_dir} exists and is not a directory; choose another --run_name")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    resume = (f"resume that run with --config {run_dir / 'config.yaml'} --ckpt_path {checkpoint}, or "
              if checkpoint.is_file() else "")
    raise UserInputError(f"run directory {run_dir} already exists and is not empty: a new run would write over "
                         f"what it holds; {resume}choose another --run_name (or --run_root)")


def cli_kwargs(args: list[str] | None = None) -> dict:
    """The arguments of `SparseVizCLI` for the command line `args` (default: sys.argv): the one
    parser of a run, of `--help`, and of the tests that check what it accepts."""
    return dict(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "default_config_files": [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else [],
            "exit_on_error": False,
            "allow_abbrev": False,  # `--trainer.max_step=30` is an error, not max_steps
            "prog": train_help.PROG,
            "description": "Train a transformer with DeepSeek Sparse Attention (or Lightning Indexers on a "
                           "pretrained model) with Lightning: options on the command line or in YAML configs.",
        },
        args=args,
    )


def run_training(args: list[str] | None = None) -> SparseVizCLI:
    """Parse `args` (default: the command line), train, and return the CLI (model, data, run_dir)."""
    silence_third_party_notices()
    cli = SparseVizCLI(**cli_kwargs(args))
    if cli.trainer.is_global_zero:
        # The run directory is self-contained: analyses of its checkpoints read their tokenizer here.
        cli.run_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(cli.datamodule, TextDataModule):
            save_tokenizer_atomic(cli.datamodule.tokenizer, cli.run_dir / "tokenizer.json")
    cli.interrupted = None
    inherited = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(cli.run_dir)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except TrainingInterrupted as stop:
        cli.interrupted = stop
    finally:  # a later run in this process chooses its own directory
        if inherited is None:
            os.environ.pop(RUN_DIR_ENV, None)
    if cli.trainer.is_global_zero:  # one announcement, not one per process
        if cli.interrupted is not None:
            print(f"{cli.interrupted}: checkpoint {cli.interrupted.checkpoint}")
        print(f"run directory: {cli.run_dir}")
        if cli.interrupted is not None:
            print(f"resume with: {resume_command(cli.run_dir, cli.interrupted.checkpoint)}")
    return cli


def resume_command(run_dir: Path, checkpoint: Path) -> str:
    """The command line that continues the run in `run_dir` from `checkpoint` exactly: its saved
    config (every option it was started with) and the checkpoint."""
    return f"python -m sparse_viz.train --config {run_dir / 'config.yaml'} --ckpt_path {checkpoint}"


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


def printed_by(parser: LightningArgumentParser, argv: list[str]) -> str:
    """What `parser` prints for `argv` (a help request), instead of printing it and exiting."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
    return buffer.getvalue()


_NOT_ACCEPTED = re.compile(r'Parser key "(model|data)".*?Problem with given class_path \'([^\']+)\':\s*'
                           r"Option '([^']+)' is not accepted", re.DOTALL)
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (\S+)")


def unknown_option_error(parser: LightningArgumentParser, message: str, args: list[str]) -> str | None:
    """One line naming the option jsonargparse refused and its nearest valid names, or None.

    jsonargparse reports `--model.topk=16` as a paragraph about Union subtypes, cut short in one
    line before it says which option was wrong; the fast check in train_help catches it on the
    command line before Lightning is imported, this one wherever it comes from (a config file, a
    class of your own, a checkout whose help snapshot is stale).
    """
    refused = _NOT_ACCEPTED.search(message)
    if refused is not None:
        key, class_path, option = refused.groups()
        listed = train_help.listed_options(printed_by(parser, [f"--{key}.help", class_path]))
        options = [name.split(".")[1] for name in listed if name.startswith(f"--{key}.")]
        given = next((arg for arg in args if re.match(rf"--{key}\.(init_args\.)?{re.escape(option)}\b", arg)), None)
        return train_help.unknown_option_line(given, option, options, prefix=f"--{key}.", owner=class_path)
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized is not None:
        given = unrecognized.group(1)
        parts = given.split("=", 1)[0][2:].split(".")
        main = [name for name in train_help.listed_options(printed_by(parser, ["--help"])) if name.startswith("--")]
        top = sorted({name[2:].split(".")[0].rstrip("+") for name in main})
        if parts[0] not in top:
            return train_help.unknown_option_line(given, parts[0], top, prefix="--")
        if parts[0] == "trainer" and len(parts) > 1:
            trainer = sorted({name.split(".")[1].rstrip("+") for name in main if name.startswith("--trainer.")})
            return train_help.unknown_option_line(given, parts[1], trainer, prefix="--trainer.")
    return None


def help_snapshot() -> dict:
    """The help texts of the real parser, for `train_help` to answer from without Lightning.

    Returns:
        {"texts": {"": what `--help` prints (the parser's options, then those of the default
        model and data classes with the default config's values, then how to see the other
        classes'), class path: what `--model.help` / `--data.help` print for it, for every model
        and data class with options of its own}, "defaults": {"model": class path, "data": class
        path}}. Printed 80 columns wide, the usage line naming `python -m sparse_viz.train`.
    """

    class Captured(Exception):
        pass

    class HelpCLI(SparseVizCLI):
        def parse_arguments(self, parser, args) -> None:
            texts, sections, chosen = {"": printed_by(parser, ["--help"])}, {}, {}
            defaults = parser.get_defaults()
            for key in ("model", "data"):
                default = defaults.get(key)
                chosen[key] = default.get("class_path") if default else None
                for class_path in class_choices(key):
                    text = printed_by(parser, [f"--{key}.help", class_path])
                    if any(name.startswith(f"--{key}.") for name in train_help.listed_options(text)):
                        texts[class_path] = text
                if chosen[key] in texts:
                    sections[key] = _options_section(parser, key, chosen[key], default.get("init_args"))
            raise Captured(texts, chosen, sections)

    saved_columns, saved_prog = os.environ.get("COLUMNS"), sys.argv[0]
    os.environ["COLUMNS"] = "80"  # argparse's width: a terminal's otherwise
    sys.argv[0] = train_help.PROG  # the prog of jsonargparse's --model.help parsers
    try:
        HelpCLI(**cli_kwargs([]))
    except Captured as captured:
        texts, chosen, sections = captured.args
    finally:
        sys.argv[0] = saved_prog
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    end = []
    for key, what in (("model", "model"), ("data", "data module")):
        if key in sections:
            end.append(textwrap.fill(f"Options of the default {what}, {chosen[key]}, with the default config's "
                                     "values:", 80) + "\n\n" + sections[key].strip("\n") + "\n")
    others = [f"  {train_help.PROG} --{key}.help {path}" for key in ("model", "data")
              for path in texts if path and path != chosen[key]
              and path.startswith("sparse_viz.training." if key == "model" else "sparse_viz.data.")]
    if others:
        end.append(textwrap.fill("The other model and data classes have options of their own (choose one with "
                                 "--model CLASS / --data CLASS, or in a config such as configs/train/recall.yaml); "
                                 "to see them:", 80) + "\n" + "\n".join(others) + "\n")
    texts[""] = "\n".join([texts[""].rstrip("\n") + "\n", *end])
    return {"texts": texts, "defaults": chosen}


def _options_section(parser: LightningArgumentParser, key: str, class_path: str, init_args) -> str:
    """The options of `class_path` as `--<key>.help` lists them, but with `init_args` (the
    default config's values) as their defaults instead of the class's."""
    module, name = class_path.rsplit(".", 1)
    help_action = parser._option_string_actions[f"--{key}.help"]  # how LightningCLI adds a class's options
    sub = type(parser)(prog=train_help.PROG)
    sub.add_class_arguments(getattr(importlib.import_module(module), name), key, **help_action.sub_add_kwargs)
    if init_args:
        sub.set_defaults({f"{key}.{option}": value for option, value in init_args.items()})
    paragraphs = sub.format_help().split("\n\n")  # usage, description, -h, then the class's group
    first = next(i for i, paragraph in enumerate(paragraphs) if re.search(rf"^  --{key}\.", paragraph, re.M))
    section = "\n\n".join(paragraphs[first:])
    return re.sub(rf"^  --{key} CONFIG .*\n", "", section, flags=re.M)  # --<key> itself: in the main options


def write_help_snapshot() -> Path:
    """Write sparse_viz/train_help_snapshot.py from the real parser (after a change to what
    `train_help.SHAPED_BY` lists, or an upgrade of Lightning / jsonargparse / torch):

        python -c "from sparse_viz.train import write_help_snapshot; write_help_snapshot()"
    """
    snapshot = help_snapshot()
    texts = {key: text.replace(str(DEFAULT_CONFIG), train_help.DEFAULT_CONFIG_MARK)
             for key, text in snapshot["texts"].items()}
    path = train_help.PACKAGE / "train_help_snapshot.py"
    source = (
        '"""What `python -m sparse_viz.train --help` prints, kept for `sparse_viz.train_help` to answer\n'
        "without importing torch or Lightning. Generated: do not edit; rewrite it with\n\n"
        '    python -c "from sparse_viz.train import write_help_snapshot; write_help_snapshot()"\n'
        '"""\n\n'
        f"FINGERPRINT = {train_help.fingerprint()!r}\n\n"
        f"DEFAULTS = {pprint.pformat(snapshot['defaults'], width=110)}\n\n"
        f"TEXTS = {pprint.pformat(texts, width=110)}\n"
    )
    temporary = path.with_suffix(".py.tmp")
    temporary.write_text(source)
    temporary.replace(path)
    return path


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, UserInputError):
        return text  # written as one line, whole (a list of valid choices can be long)
    return text if len(text) < 400 else text[:397] + "..."  # jsonargparse's paragraphs


if __name__ == "__main__":
    # Keep stderr for what matters: errors are one line, and progress is Lightning's own bar.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    request = train_help.help_request(sys.argv[1:], class_choices("model") + class_choices("data"))
    if request is not None:
        # Not answered before the imports (the help snapshot is stale): the same text, from the real parser.
        help_texts = help_snapshot()["texts"]
        if request in help_texts:
            sys.stdout.write(help_texts[request])
            sys.exit(0)
    try:
        finished = run_training()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the user's input
        cause = user_error_in_chain(error)
        if cause is None:
            raise
        print(f"sparse_viz.train: error: {_one_line(cause)}", file=sys.stderr)
        sys.exit(2)
    if finished.interrupted is not None:
        sys.exit(128 + finished.interrupted.signum)  # the shell's convention for death by a signal
