"""Nothing a user already has is destroyed by a command that writes a folder of results.

The rule (`sparse_viz.output_dir`): an output folder is written whole at the end; an existing
folder must be empty, or an earlier result of this project (its manifest lists every file in it)
replaced only with `--overwrite`; a folder holding anything else is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_cli import run_analysis_cli

from sparse_viz.errors import UserInputError
from sparse_viz.output_dir import MANIFEST_NAME, check_output_dir, read_manifest, write_output_dir

ROOT = Path(__file__).resolve().parents[1]


def user_folder(path: Path) -> Path:
    """A folder of a user's own files, one of them in a subfolder (as the issue's report had it)."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "ideas.txt").write_text("keep me")
    (path / "draft.md").write_text("mine")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def write_result(output: Path, text: str, overwrite: bool = False) -> None:
    with write_output_dir(output, written_by="test", overwrite=overwrite) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "result.txt").write_text(text)
        (staging / "metadata.json").write_text("{}")


# -- the rule itself ------------------------------------------------------------------------------


def test_a_new_folder_is_written_with_a_manifest_of_exactly_its_files(tmp_path):
    out = tmp_path / "new"
    write_result(out, "one")
    assert (out / "sub" / "result.txt").read_text() == "one"
    assert read_manifest(out)["files"] == ["metadata.json", "sub/result.txt"]
    assert siblings(out) == []  # no staging folder left beside it


def test_an_empty_folder_is_written_into(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_result(out, "one")
    assert (out / "sub" / "result.txt").read_text() == "one"


def test_an_earlier_result_is_replaced_only_with_consent(tmp_path):
    out = tmp_path / "result"
    write_result(out, "one")
    with pytest.raises(UserInputError, match="pass --overwrite"):
        write_result(out, "two")
    assert (out / "sub" / "result.txt").read_text() == "one"
    write_result(out, "two", overwrite=True)
    assert (out / "sub" / "result.txt").read_text() == "two"
    assert siblings(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_someone_elses_files_is_never_touched(tmp_path, overwrite):
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    with pytest.raises(UserInputError, match="did not write"):
        write_result(out, "one", overwrite=overwrite)
    assert snapshot(out) == before and siblings(out) == []


def test_an_earlier_result_with_a_file_added_by_the_user_is_not_replaced(tmp_path):
    out = tmp_path / "result"
    write_result(out, "one")
    (out / "sub" / "my_notes.txt").write_text("added later")
    with pytest.raises(UserInputError, match=r"holds files sparse_viz did not write \(sub/my_notes.txt\)"):
        write_result(out, "two", overwrite=True)
    assert (out / "sub" / "my_notes.txt").read_text() == "added later"
    assert (out / "sub" / "result.txt").read_text() == "one"


def test_a_file_added_while_the_analysis_runs_stops_the_replacement(tmp_path):
    out = tmp_path / "result"
    write_result(out, "one")
    with pytest.raises(UserInputError, match="did not write"):
        with write_output_dir(out, written_by="test", overwrite=True) as staging:
            (staging / "metadata.json").write_text("{}")
            (out / "arrived.txt").write_text("while it ran")
    assert (out / "arrived.txt").read_text() == "while it ran"
    assert siblings(out) == []


def test_a_failure_while_writing_leaves_the_earlier_result_and_no_staging(tmp_path):
    out = tmp_path / "result"
    write_result(out, "one")
    with pytest.raises(RuntimeError):
        with write_output_dir(out, written_by="test", overwrite=True) as staging:
            (staging / "partial.txt").write_text("half")
            raise RuntimeError("analysis failed")
    assert (out / "sub" / "result.txt").read_text() == "one" and not (out / "partial.txt").exists()
    assert siblings(out) == []


def test_a_forged_or_broken_manifest_is_not_taken_as_consent(tmp_path):
    out = user_folder(tmp_path / "mine")
    (out / MANIFEST_NAME).write_text("not json")
    with pytest.raises(UserInputError, match="did not write"):
        check_output_dir(out, overwrite=True)
    (out / MANIFEST_NAME).write_text('{"files": ["draft.md"]}')  # lists some files, not notes/ideas.txt
    with pytest.raises(UserInputError, match="notes/ideas.txt"):
        check_output_dir(out, overwrite=True)


def test_a_file_as_output_is_refused(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(UserInputError, match="not a directory"):
        check_output_dir(path, overwrite=True)


# -- every command that writes a folder -----------------------------------------------------------


def command_lines(model: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each analysis subcommand that writes a folder, as a user would run it on a tiny model."""
    batch = tmp_path / "batch.yaml"
    batch.write_text("prompts:\n  - name: one\n    prompt: hello there\n")
    common = ["--model", str(model), "--prompt", "hello there"]
    return {
        "mask": ["mask", *common],
        "heads": ["heads", *common, "--ablate", "0.1"],
        "components": ["components", *common, "--ablate", "0.o_proj:0"],
        "components-sweep": ["components", *common, "--sweep", "0.o_proj:0-1"],
        "impact": ["impact", *common, "--k", "2"],
        "sparse-eval": ["sparse-eval", "--model", str(model), "--corpus", str(ROOT / "README.md"), "--seq-len", "16",
                        "--windows", "1", "--k", "4", "--selectors", "dense", "local"],
        "batch": ["batch", "--config", str(batch), "--model", str(model)],
    }


COMMANDS = ["mask", "heads", "components", "components-sweep", "impact", "sparse-eval", "batch"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_analysis_command_leaves_a_users_folder_as_it_was(tiny_model_dirs, tmp_path, capsys, command):
    out = user_folder(tmp_path / "work" / "out")
    before = snapshot(out)
    argv = [*command_lines(tiny_model_dirs["llama"], tmp_path)[command], "--output", str(out), "--overwrite"]
    result = run_analysis_cli(argv, capsys)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did not write" in lines[0] and str(out) in lines[0], result.stderr
    assert snapshot(out) == before and siblings(out) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_analysis_command_replaces_its_own_result_only_with_overwrite(tiny_model_dirs, tmp_path, capsys,
                                                                            command):
    out = tmp_path / "work" / "out"
    argv = [*command_lines(tiny_model_dirs["llama"], tmp_path)[command], "--output", str(out)]
    assert run_analysis_cli(argv, capsys).returncode == 0
    first = snapshot(out)
    assert read_manifest(out)["files"] == sorted(name for name in first if name != MANIFEST_NAME)

    again = run_analysis_cli(argv, capsys)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert snapshot(out) == first

    assert run_analysis_cli([*argv, "--overwrite"], capsys).returncode == 0
    assert siblings(out) == []


def test_without_output_each_run_gets_a_new_folder(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = command_lines(tiny_model_dirs["llama"], tmp_path)["heads"]
    for _ in range(2):
        assert run_analysis_cli(argv, capsys).returncode == 0
    made = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(made) == 2 and all(name.startswith("heads-") for name in made), made


def test_help_says_what_happens_to_an_existing_output_folder(capsys):
    for command in ("mask", "heads", "components", "impact", "sparse-eval", "batch"):
        result = run_analysis_cli([command, "--help"], capsys)
        text = " ".join(result.stdout.split())
        assert result.returncode == 0
        assert "--overwrite" in text and "never touched" in text and "default" in text, command


def test_the_checkpoint_conversion_refuses_a_users_folder_even_with_force(tmp_path):
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    result = subprocess.run([sys.executable, "-m", "sparse_viz.pretrained.smollm2", "--output", str(out), "--force"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "did not write" in result.stderr, result.stderr
    assert snapshot(out) == before


def test_an_experiment_refuses_to_train_into_its_existing_runs(tmp_path):
    """experiments/recall/run.py trains one run directory per selector; an existing one stops the
    script before any training starts (the same check guards selector_comparison)."""
    out = tmp_path / "recall"
    user_folder(out / "dense")
    before = snapshot(out)
    env = {**os.environ, "SPARSE_VIZ_RECALL_OUT": str(out)}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "recall" / "run.py"), "--only", "dense"],
                            capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and str(out / "dense") in lines[0], result.stderr
    assert snapshot(out) == before
