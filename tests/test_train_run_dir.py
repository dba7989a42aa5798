"""A new training run never starts in a directory that holds something already.

`--run_name X` twice used to write the second run over the first (metrics.csv, checkpoints/,
analysis/, the report), and a --run_root / --run_name pointed at any other folder wrote into it.
What is on disk before and after is compared byte for byte; the rule for processes of a cluster
launcher (only global rank 0 may refuse: the others find rank 0's fresh directory) is checked on
the parser alone, without training.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_viz.errors import UserInputError
from sparse_viz.train import SparseVizCLI, cli_kwargs, run_training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "train" / "tiny.yaml")


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a directory)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("SPARSE_VIZ_RUN_DIR", None)
    return subprocess.run([sys.executable, "-m", "sparse_viz.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_run_named_after_a_folder_with_a_file_in_it_is_refused_and_writes_nothing(tmp_path):
    root = tmp_path / "runs"
    folder = root / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes, not a run\n")
    before = tree(tmp_path)
    result = run_cli("--config", TINY, "--run_root", str(root), "--run_name", "mine",
                     f"--data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert str(folder) in lines[0] and "--run_name" in lines[0], lines[0]
    assert "--ckpt_path" not in lines[0]  # no run to resume there: resuming is not offered
    assert tree(tmp_path) == before  # the user's file as it was, and no cache, config or checkpoint


def test_the_same_run_name_twice_is_refused_with_the_command_that_resumes_it(tmp_path):
    root = tmp_path / "runs"
    common = ["--config", TINY, "--run_root", str(root), f"--data.cache_dir={tmp_path / 'cache'}",
              "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]
    first = run_training([*common, "--run_name", "twice", "--trainer.max_steps=2"])
    before = tree(first.run_dir)
    with pytest.raises(UserInputError) as refused:
        run_training([*common, "--run_name", "twice", "--trainer.max_steps=2"])
    message = str(refused.value)
    assert "\n" not in message and str(first.run_dir) in message
    assert tree(first.run_dir) == before
    # the command it names continues the first run, in its directory
    resume = re.search(r"--config (\S+) --ckpt_path (\S+?),", message)
    assert resume is not None, message
    assert resume.groups() == (str(first.run_dir / "config.yaml"), str(first.run_dir / "checkpoints" / "last.ckpt"))
    resumed = run_training(["--config", resume.group(1), "--ckpt_path", resume.group(2), "--trainer.max_steps=3"])
    assert resumed.run_dir == first.run_dir and resumed.trainer.global_step == 3


class Chosen(Exception):
    """Raised once the run directory is chosen: the parser's work, without data or model."""


class ChooseRunDirOnly(SparseVizCLI):
    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        raise Chosen(self.run_dir)


@pytest.mark.parametrize("environment, refused", [
    ({}, True),
    ({"WORLD_SIZE": "2", "RANK": "0"}, True),  # torchrun's rank 0
    ({"WORLD_SIZE": "2", "RANK": "1"}, False),  # another rank: rank 0 may have made it already
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, True),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, False),
])
def test_only_global_rank_0_of_a_launcher_refuses_a_used_run_directory(tmp_path, monkeypatch, environment, refused):
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID", "SPARSE_VIZ_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["sparse_viz.train"])  # pytest's own arguments are not the command's
    used = tmp_path / "runs" / "shared"
    (used / "checkpoints").mkdir(parents=True)
    (used / "config.yaml").write_text("seed_everything: 0\n")  # as rank 0 leaves it early in its run
    args = ["--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "shared"]
    with pytest.raises(UserInputError if refused else Chosen) as outcome:
        ChooseRunDirOnly(**cli_kwargs(args))
    if not refused:
        assert outcome.value.args[0] == used


def test_an_empty_directory_made_beforehand_and_a_resume_into_a_named_directory_are_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSE_VIZ_RUN_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["sparse_viz.train"])
    empty = tmp_path / "runs" / "prepared"
    empty.mkdir(parents=True)
    with pytest.raises(Chosen) as chosen:
        ChooseRunDirOnly(**cli_kwargs(["--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "prepared"]))
    assert chosen.value.args[0] == empty
    (empty / "metrics.csv").write_text("step\n")
    checkpoint = tmp_path / "elsewhere.ckpt"
    checkpoint.write_bytes(b"")  # only its existence is checked before instantiation
    with pytest.raises(Chosen) as chosen:
        ChooseRunDirOnly(**cli_kwargs(["--config", TINY, "--run_root", str(tmp_path / "runs"), "--run_name", "prepared",
                                       "--ckpt_path", str(checkpoint)]))
    assert chosen.value.args[0] == empty
