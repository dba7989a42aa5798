"""The analysis command line is never silent about what it chose for the user: abbreviated
options are refused, the built-in prompt is announced, a mode that cannot do what its name says
warns."""

from __future__ import annotations

import pytest
from analysis_cli import run_analysis_cli
from tiny_models import save_tiny, tiny_qwen3

from sparse_viz.pretrained.prompts import DEFAULT_PROMPT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = tiny_qwen3()
    return save_tiny(model, tokenizer, tmp_path_factory.mktemp("tiny") / "qwen3")


@pytest.mark.parametrize("argv, option", [
    (["mask", "--model", "m", "--num-tok", "3"], "--num-tok"),
    (["heads", "--model", "m", "--swe"], "--swe"),
    (["components", "--model", "m", "--abl", "0.o_proj:0"], "--abl"),
    (["batch", "--conf", "x.yaml"], "--conf"),
])
def test_abbreviated_options_are_refused_in_one_line(argv, option, capsys):
    result = run_analysis_cli(argv, capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert option in lines[0]


def test_the_built_in_prompt_is_announced(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./prompt.txt here
    result = run_analysis_cli(["mask", "--model", str(model_dir), "--layers", "0", "--no-report",
                               "--output", str(tmp_path / "out")], capsys)
    assert result.returncode == 0, result.stderr
    assert "built-in prompt" in result.stderr and DEFAULT_PROMPT in result.stderr


def test_a_given_prompt_is_not_announced(model_dir, tmp_path, capsys):
    result = run_analysis_cli(["mask", "--model", str(model_dir), "--prompt", "Hello there", "--layers", "0",
                               "--no-report", "--output", str(tmp_path / "out")], capsys)
    assert result.returncode == 0, result.stderr
    assert "built-in prompt" not in result.stderr


@pytest.mark.parametrize("extra, warns", [
    ([], True),                       # SVD, every ci = 1: adversarial == deterministic
    (["--ci-default", "0.5"], False),  # room for PGD
])
def test_adversarial_mode_warns_when_it_can_only_be_deterministic(model_dir, tmp_path, capsys, extra, warns):
    result = run_analysis_cli(["components", "--model", str(model_dir), "--prompt", "Hello there",
                               "--ablate", "1.o_proj:0", "--mode", "adversarial", "--pgd-steps", "1",
                               "--no-patterns", "--output", str(tmp_path / "out"), *extra], capsys)
    assert result.returncode == 0, result.stderr
    assert ("nothing to vary" in result.stderr) == warns


def test_help_speaks_of_things_a_user_can_look_up(capsys):
    """The project's planning documents ("seed 000", "seed 001") are not anything a user has."""
    texts = [run_analysis_cli(["--help"], capsys).stdout]
    for command in ("mask", "heads", "components", "impact", "sparse-eval", "batch"):
        texts.append(run_analysis_cli([command, "--help"], capsys).stdout)
    for text in texts:
        assert "seed 0" not in text and "seed's" not in text, text
