"""`python -m sparse_viz.train --help` and misspelled options: fast, complete, one line.

The help used to take 10-30 s (importing torch and Lightning, then building LightningCLI's
parser), named `train.py` in its usage line, and left the model's options to `--model.help`; a
misspelled model option answered after as long with a jsonargparse paragraph cut off mid-word.
Now both are answered from `sparse_viz/train_help_snapshot.py` before anything heavy is imported.

The independent check of that snapshot is the real parser: every option the help lists is one
LightningCLI's parser accepts (the keys of the configuration it parses), and the other way round,
for the default model and data classes and for the others.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_viz import train_help
from sparse_viz.errors import UserInputError
from sparse_viz.train import SparseVizCLI, cli_kwargs, run_training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "train" / "tiny.yaml")
HEAVY = ("torch", "lightning", "jsonargparse", "datasets", "transformers")
REGENERATE = 'python -c "from sparse_viz.train import write_help_snapshot; write_help_snapshot()"'


def train_command(*args: str) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """Run `python -m sparse_viz.train ARGS` in a fresh process: (result with the importtime lines
    taken out of stderr, wall seconds, top-level packages it imported)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparse_viz.train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    stderr = "".join(line + "\n" for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr), seconds, imported


@pytest.fixture(scope="module")
def snapshot() -> dict:
    found = train_help.current_snapshot()
    assert found is not None, f"sparse_viz/train_help_snapshot.py is stale (or missing): rewrite it with {REGENERATE}"
    return found


def test_help_is_answered_in_seconds_without_importing_torch_or_lightning(snapshot):
    result, seconds, imported = train_command("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    # Why 10 s: Python's start and this help take ~0.3 s on the shared 2-core machine, while
    # importing torch and Lightning alone took 6 s there idle and 10-30 s under load (the help
    # this replaces); 10 s fails any path that imports them and leaves a loaded machine 30x room.
    assert seconds < 10, seconds
    assert result.stdout == snapshot["texts"][""]


def test_help_names_the_command_and_lists_the_default_classes_options_then_how_to_see_the_others(snapshot):
    text = snapshot["texts"][""]
    assert text.startswith("usage: python -m sparse_viz.train ")
    options = train_help.listed_options(text)
    for option in ("--model.top_k", "--model.selector", "--model.stages", "--data.seq_len", "--data.corpus",
                   "--trainer.max_steps", "--run_name", "--ckpt_path"):
        assert option in options, option
    tail = text.rstrip("\n").splitlines()[-2:]
    assert tail == ["  python -m sparse_viz.train --model.help sparse_viz.training.RetrofitLightningModule",
                    "  python -m sparse_viz.train --data.help sparse_viz.data.RecallDataModule"]


class Parsed(Exception):
    pass


def option_of(key: str) -> str:
    """The option that sets a configuration key, to its first level: `model.init_args.top_k` ->
    `--model.top_k`, `model.class_path` -> `--model`, `trainer.max_steps` -> `--trainer.max_steps`."""
    parts = key.replace(".init_args.", ".").split(".")
    if parts[-1] == "class_path":
        parts = parts[:-1]
    return "--" + ".".join(parts[:2])


@pytest.fixture(scope="module")
def accepted() -> dict[tuple[str, str], set[str]]:
    """What LightningCLI's parser accepts, from the configurations it parses: {(model class, data
    class): {"--run_name", "--trainer.max_steps", "--model.top_k", ...}}."""
    combinations = [("sparse_viz.training.DSALightningModule", "sparse_viz.data.TextDataModule"),
                    ("sparse_viz.training.RetrofitLightningModule", "sparse_viz.data.RecallDataModule")]

    class ParseOnly(SparseVizCLI):
        def parse_arguments(self, parser, args) -> None:
            found = {}
            for model, data in combinations:
                config = parser.parse_args(["--model", model, "--data", data])
                found[(model, data)] = {option_of(key) for key in config.keys() if not key.startswith("__")}
            raise Parsed(found)

    saved = sys.argv
    sys.argv = ["sparse_viz.train"]  # pytest's own arguments are not the command's
    try:
        ParseOnly(**cli_kwargs([]))
    except Parsed as parsed:
        return parsed.args[0]
    finally:
        sys.argv = saved
    raise AssertionError("the parser was not reached")


def first_levels(options: list[str]) -> set[str]:
    """`--trainer.callbacks+` -> `--trainer.callbacks`; help and config-file options left out."""
    meta = {"-h", "--help", "-c", "--config", "--print_config"}
    found = set()
    for option in options:
        if option in meta or option.endswith(".help") or not option.startswith("--"):
            continue
        parts = option[2:].rstrip("+").split(".")
        found.add("--" + ".".join(parts[:2]))
    return found


def test_the_help_lists_exactly_what_the_real_parser_accepts_for_the_default_classes(snapshot, accepted):
    listed = first_levels(train_help.listed_options(snapshot["texts"][""]))
    expected = accepted[("sparse_viz.training.DSALightningModule", "sparse_viz.data.TextDataModule")] - {"--config"}
    # the main options name --trainer, --model, --data themselves (a config file or class for each)
    assert listed - expected == {"--trainer"}, sorted(listed - expected)
    assert expected - listed == set(), sorted(expected - listed)


def test_the_other_classes_help_lists_exactly_what_the_real_parser_accepts(snapshot, accepted):
    model, data = "sparse_viz.training.RetrofitLightningModule", "sparse_viz.data.RecallDataModule"
    expected = accepted[(model, data)]
    for key, class_path in (("model", model), ("data", data)):
        listed = {option for option in first_levels(train_help.listed_options(snapshot["texts"][class_path]))
                  if option.startswith(f"--{key}.")}
        assert listed == {option for option in expected if option.startswith(f"--{key}.")}, class_path
    result, _, imported = train_command("--model.help", "RetrofitLightningModule")
    assert result.returncode == 0 and "--model.model_path" in result.stdout, result.stderr[-2000:]
    assert not imported & set(HEAVY)


def reference_nearest(misspelled: str, class_path: str) -> str:
    """The parameter of the class's constructor closest to `misspelled` (difflib over its signature)."""
    module, name = class_path.rsplit(".", 1)
    parameters = [p for p in inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
                  if p != "self"]
    return difflib.get_close_matches(misspelled, parameters, n=1)[0]


@pytest.mark.parametrize("args, misspelled, named, owner", [
    (["--model.topk=16"], "topk", "--model.top_k", "sparse_viz.training.DSALightningModule"),
    (["--config", "configs/train/recall.yaml", "--data.num_pair", "16"], "num_pair", "--data.num_pairs",
     "sparse_viz.data.RecallDataModule"),  # the class the config chose
    (["--model", "RetrofitLightningModule", "--model.indexer_head=2"], "indexer_head", "--model.indexer_heads",
     "sparse_viz.training.RetrofitLightningModule"),
    (["--trainer.max_step=30"], "max_step", "--trainer.max_steps", None),
    (["--run_nam", "x"], "run_nam", "--run_name", None),
])
def test_a_misspelled_option_is_one_line_naming_the_nearest_valid_names_before_lightning(snapshot, args, misspelled,
                                                                                         named, owner):
    result, seconds, imported = train_command(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    given = next(arg for arg in args if misspelled in arg)
    assert lines[0].startswith(f"sparse_viz.train: error: unrecognized arguments: {given} ("), lines[0]
    assert named in lines[0], lines[0]
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert seconds < 10, seconds  # as for --help
    reference = owner or ("lightning.pytorch.Trainer" if named.startswith("--trainer.") else None)
    if reference is not None:
        assert named.split(".", 1)[1] == reference_nearest(misspelled, reference)
    if owner is not None:
        assert f"{owner} has no option {misspelled}" in lines[0]


def test_the_check_passes_every_valid_option_and_config(snapshot):
    """No false alarm: every option the help lists for each class, and every shipped config."""
    for class_path, text in snapshot["texts"].items():
        key = "model" if class_path.startswith("sparse_viz.training.") else "data"
        choose = [f"--{key}", class_path] if class_path else []
        for option in train_help.listed_options(text):
            if option.startswith("--"):
                assert train_help.misspelled_option([*choose, f"{option}=1"], snapshot) is None, option
    for config in sorted((REPO / "configs" / "train").glob("*.yaml")):
        assert train_help.misspelled_option(["--config", str(config)], snapshot) is None, config
    readme_args = ["--trainer.max_steps=200", "--model.top_k=16", "--data.corpus=path/to/texts/",
                   "--data", "sparse_viz.data.RecallDataModule", "--data.num_pairs=16",
                   "--trainer.callbacks+=sparse_viz.tracking.SelectionAnalysisCallback",
                   "--trainer.callbacks.every_n_steps=5", "--model.init_args.top_k=8", "--optimizer.lr=1"]
    assert train_help.misspelled_option(readme_args, snapshot) is None


def test_a_stale_snapshot_is_never_used(monkeypatch):
    monkeypatch.setattr(train_help, "fingerprint", lambda: "something else changed")
    assert train_help.current_snapshot() is None
    assert train_help.answer_without_lightning(["--help"]) is None  # returns: the real parser answers
    assert train_help.answer_without_lightning(["--model.topk=16"]) is None


@pytest.mark.parametrize("args, fragment", [
    (["--model.topk=16"], "unrecognized arguments: --model.topk=16 (sparse_viz.training.DSALightningModule has no "
                          "option topk; did you mean --model.top_k?)"),
    (["--trainer.max_step=30"], "unrecognized arguments: --trainer.max_step=30 (did you mean --trainer.max_steps"),
])
def test_the_real_parser_names_the_nearest_option_too(args, fragment, monkeypatch, tmp_path):
    """Where the snapshot does not answer (stale, a config file, a run started from Python), the
    real parser's error becomes the same line; it refuses an abbreviation by itself too (the
    check before Lightning would hide a parser that expanded it)."""
    monkeypatch.setattr(sys, "argv", ["sparse_viz.train"])
    with pytest.raises(UserInputError) as refused:
        run_training(["--config", TINY, "--run_root", str(tmp_path / "runs"), f"--data.cache_dir={tmp_path / 'cache'}",
                      *args])
    assert fragment in str(refused.value)
