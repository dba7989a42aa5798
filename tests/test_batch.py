"""Batch mode: a YAML list of prompts, one output folder per entry, bad entries reported by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from analysis_cli import run_analysis_cli
from test_vision_tiny_model import save_tiny_vl, test_image, tiny_qwen3_vl
from tiny_models import save_tiny, tiny_qwen3

from sparse_viz.analysis.batch import load_batch_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model, tokenizer, processor = tiny_qwen3_vl(n_layers=2)
    save_tiny_vl(model, tokenizer, processor, root / "vl")
    text_model, text_tokenizer = tiny_qwen3(n_layers=1)
    save_tiny(text_model, text_tokenizer, root / "text")
    test_image(64, 64).save(root / "a.png")
    return root


def run_batch_cli(args: list[str], capsys) -> subprocess.CompletedProcess:
    return run_analysis_cli(["batch", *args], capsys)


def write_yaml(path: Path, document) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_three_entries_one_missing_image_gives_two_outputs_and_an_error_naming_the_third(files, tmp_path, capsys):
    config = write_yaml(
        tmp_path / "prompts.yaml",
        {
            "prompts": [
                {"name": "describe", "image": str(files / "a.png"), "prompt": "Describe this", "num_tokens": 2},
                {"name": "patches", "images": [str(files / "a.png")], "prompt": "Color?", "mask": "vision"},
                {"name": "broken", "image": str(files / "missing.png"), "prompt": "Hm"},
            ]
        },
    )
    output = tmp_path / "out"
    result = run_batch_cli(["--config", str(config), "--model", str(files / "vl"), "--device", "cpu", "--output", str(output)], capsys)
    assert result.returncode == 2
    assert "batch entry 'broken'" in result.stderr and "missing.png" in result.stderr and "does not exist" in result.stderr
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["describe", "patches"]
    describe = pd.read_csv(output / "describe" / "masking_results.csv")
    assert describe.generation_step.max() == 1 and "image" not in set(describe.token_kind)
    patches = pd.read_csv(output / "patches" / "masking_results.csv")
    assert set(patches.token_kind) == {"image"} and (output / "patches" / "vision_report.html").is_file()
    index = json.loads((output / "index.json").read_text())
    assert [(e["name"], e["status"]) for e in index["entries"]] == [("describe", "ok"), ("patches", "ok"), ("broken", "error")]
    assert (output / "index.html").is_file()


def test_text_model_batch_with_config_model_and_output(files, tmp_path, capsys):
    config = write_yaml(
        tmp_path / "prompts.yaml",
        {"model": str(files / "text"), "output": str(tmp_path / "out"), "prompts": [{"name": "t", "prompt": "Hi there"}]},
    )
    result = run_batch_cli(["--config", str(config), "--device", "cpu"], capsys)
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(tmp_path / "out" / "t" / "masking_results.csv")
    assert rows.token_position.nunique() == len("Hi there") + 1


def test_unknown_entry_key_is_reported_by_name_and_others_run(files, tmp_path, capsys):
    config = write_yaml(
        tmp_path / "prompts.yaml",
        [{"name": "good", "prompt": "Hi"}, {"name": "typo", "prompt": "Hi", "num_token": 3}],
    )
    output = tmp_path / "out"
    result = run_batch_cli(["--config", str(config), "--model", str(files / "text"), "--device", "cpu", "--output", str(output)], capsys)
    assert result.returncode == 2
    assert "batch entry 'typo': unknown key(s) num_token" in result.stderr
    assert (output / "good" / "masking_results.csv").is_file() and not (output / "typo").exists()


def test_image_entry_on_a_text_model_is_reported_by_name(files, tmp_path, capsys):
    config = write_yaml(tmp_path / "p.yaml", [{"name": "pic", "prompt": "Hi", "image": str(files / "a.png")}])
    result = run_batch_cli(["--config", str(config), "--model", str(files / "text"), "--output", str(tmp_path / "o")], capsys)
    assert result.returncode == 2 and "batch entry 'pic'" in result.stderr and "text-only" in result.stderr


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("prompts: [", "not valid YAML"),
        ("models: x\nprompts: [{name: a, prompt: b}]", "unknown key(s) models"),
        ("prompts: []", "non-empty list"),
        ("just text", "non-empty list"),
    ],
)
def test_a_bad_file_is_one_line_exit_2_before_any_model_loads(tmp_path, capsys, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = run_batch_cli(["--config", str(config), "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")], capsys)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_entry_validation_rules(tmp_path):
    config = write_yaml(
        tmp_path / "p.yaml",
        [
            {"name": "ok", "prompt": "x", "images": ["a.png"], "mask": "all", "layers": "0"},
            {"name": "ok", "prompt": "dup"},
            {"name": "bad/name", "prompt": "x"},
            {"name": "nomask", "prompt": "x", "mask": "vision"},
            {"name": "zero", "prompt": "x", "num_tokens": 0},
            {"prompt": "no name"},
        ],
    )
    parsed = load_batch_config(config)
    assert [e.name for e in parsed.entries] == ["ok"]
    assert parsed.entries[0].images == ["a.png"] and parsed.entries[0].mask == "all"
    assert [name for name, _ in parsed.invalid] == ["ok", "bad/name", "nomask", "zero", "#6"]
    assert "duplicate" in parsed.invalid[0][1] and "needs an image" in parsed.invalid[2][1]


def test_the_example_config_parses():
    parsed = load_batch_config(REPO_ROOT / "configs" / "analysis" / "prompts.yaml")
    assert parsed.invalid == [] and len(parsed.entries) == 3 and parsed.model == ".cache/smollm2-135m"
    vl = load_batch_config(REPO_ROOT / "configs" / "analysis" / "prompts_vl.yaml")
    assert vl.invalid == [] and len(vl.entries) == 4 and vl.model is None  # needs --model: no VL ships
    assert all((REPO_ROOT / image).is_file() for entry in vl.entries for image in entry.images)


@pytest.mark.smollm2
@pytest.mark.slow
def test_the_shipped_text_config_runs_offline_as_shipped(smollm2_dir, tmp_path, capsys, monkeypatch):
    """The README's batch command with nothing added: the model path in the YAML is the one
    `scripts/setup.sh --dev` converts, relative to the repository root."""
    monkeypatch.chdir(REPO_ROOT)
    result = run_batch_cli(["--config", "configs/analysis/prompts.yaml", "--output", str(tmp_path / "out"),
                            "--no-report"], capsys)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["status"] for e in index["entries"]] == ["ok", "ok", "ok"]


def test_the_shipped_vision_config_runs_on_a_qwen3_vl_checkpoint(files, tmp_path, capsys, monkeypatch):
    """prompts_vl.yaml as shipped (its image included), on the tiny Qwen3-VL the tests build."""
    monkeypatch.chdir(REPO_ROOT)
    result = run_batch_cli(["--config", "configs/analysis/prompts_vl.yaml", "--model", str(files / "vl"),
                            "--output", str(tmp_path / "out"), "--no-report"], capsys)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["status"] for e in index["entries"]] == ["ok"] * 4
