"""`python -m sparse_viz.analysis mask`: a real run writes every output; bad input is one line,
exit 2, and nothing (half-)written.

Two runs go through a real subprocess (the `python -m` entry point end to end); the bad-input
table calls the same `cli.main` in-process, because each subprocess pays ~4 s of CPU to import
torch and transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from analysis_cli import run_analysis_cli

from sparse_viz.report.masking import RESULT_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    # One thread, as in conftest: OpenMP threads thrash on a small, shared machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sparse_viz.analysis", "mask", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )


def run_cli_in_process(args: list[str], capsys, cwd: Path | None = None, monkeypatch=None) -> subprocess.CompletedProcess:
    """`cli.main(["mask", *args])` with its exit status and output, like `run_cli`."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return run_analysis_cli(["mask", *args], capsys)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


def test_a_run_writes_results_metadata_and_report(tiny_model_dirs, tmp_path):
    output = tmp_path / "run"
    result = run_cli(
        "--model", str(tiny_model_dirs["qwen3"]), "--prompt", "Hi, you.", "--num-tokens", "2",
        "--layers", "0-1", "--exclude-first-token", "--device", "cpu", "--output", str(output),
    )
    assert result.returncode == 0, result.stderr
    assert "generated:" in result.stdout
    rows = pd.read_csv(output / "masking_results.csv", keep_default_na=False)
    n_prompt = 9  # <bos> + 8 bytes
    heads = 4
    # step 0: positions 1..8, step 1: positions 1..9; 2 layers; Full + Attn + 4 heads
    assert len(rows) == (8 + 9) * 2 * (2 + heads)
    assert list(rows.columns) == list(RESULT_COLUMNS)
    assert set(rows["layer"]) == {0, 1} and 0 not in set(rows["token_position"])
    columns = json.loads((output / "masking_results.json").read_text())["columns"]
    assert len(columns["l2_distance"]) == len(rows)
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["prompt"] == "Hi, you." and metadata["num_steps"] == 2
    assert len(metadata["steps"][1]["tokens"]) == n_prompt + 1
    assert (output / "report.html").stat().st_size > 0


@pytest.fixture(scope="module")
def unsupported_model_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    directory = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=8, n_head=2).to_json_file(directory / "config.json")
    return directory


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing model dir", "does not exist"),
        ("unsupported architecture", "supported: llama, mistral, qwen2, qwen3, qwen3_vl"),
        ("empty prompt", "prompt is empty"),
        ("prompt longer than context", "longer than the model's context"),
        ("num-tokens < 1", "--num-tokens must be >= 1"),
        ("bad layers", "bad --layers spec"),
        ("unwritable output", "cannot write output directory"),
        ("unknown dtype", "unknown dtype 'float8'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_nothing_written(
    case, fragment, tiny_model_dirs, unsupported_model_dir, tmp_path, capsys
):
    model = str(tiny_model_dirs["llama"])
    output = tmp_path / "out"
    args = {"--model": model, "--prompt": "Hello", "--device": "cpu", "--output": str(output)}
    if case == "missing model dir":
        args["--model"] = str(tmp_path / "no-such-model")
    elif case == "unsupported architecture":
        args["--model"] = str(unsupported_model_dir)
    elif case == "empty prompt":
        args["--prompt"] = ""
    elif case == "prompt longer than context":
        args["--prompt"] = "x" * 80  # tiny context: 64 positions
    elif case == "num-tokens < 1":
        args["--num-tokens"] = "0"
    elif case == "bad layers":
        args["--layers"] = "0,5-x"
    elif case == "unwritable output":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        output = blocker / "out"  # a directory cannot be made inside a regular file
        args["--output"] = str(output)
    elif case == "unknown dtype":
        args["--dtype"] = "float8"
    result = run_cli_in_process([item for pair in args.items() for item in pair], capsys)
    assert_one_line_error(result, fragment)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left


def test_a_failed_run_keeps_the_previous_output(tiny_model_dirs, tmp_path):
    """Through a real subprocess: an error after the model has loaded."""
    output = tmp_path / "out"
    first = run_cli("--model", str(tiny_model_dirs["llama"]), "--prompt", "Hello", "--layers", "0",
                    "--device", "cpu", "--output", str(output), "--no-report")
    assert first.returncode == 0, first.stderr
    previous = {p.name: p.read_bytes() for p in output.iterdir()}
    result = run_cli("--model", str(tiny_model_dirs["llama"]), "--prompt", "Hello", "--layers", "7",
                     "--device", "cpu", "--output", str(output), "--overwrite")
    assert_one_line_error(result, "outside 0-1")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == previous
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_prompt_file_defaults_to_prompt_txt(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompt.txt").write_text("From file.\n")
    args = ["--model", str(tiny_model_dirs["llama"]), "--layers", "0", "--device", "cpu",
            "--output", str(tmp_path / "out"), "--no-report"]
    result = run_cli_in_process(args, capsys, cwd=tmp_path, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["prompt"] == "From file.\n"
