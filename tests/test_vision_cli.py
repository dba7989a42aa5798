"""`python -m sparse_viz.analysis mask --image ...` on a saved tiny Qwen3-VL: seed 001's commands,
outputs (results with token-map columns, heatmaps, vision report), and one-line errors."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
from analysis_cli import run_analysis_cli
from test_vision_tiny_model import save_tiny_vl, test_image, tiny_qwen3_vl
from tiny_models import save_tiny, tiny_qwen3


@pytest.fixture(scope="module")
def vl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    model, tokenizer, processor = tiny_qwen3_vl(n_layers=2)
    save_tiny_vl(model, tokenizer, processor, root / "vl")
    text_model, text_tokenizer = tiny_qwen3(n_layers=1)
    save_tiny(text_model, text_tokenizer, root / "text")
    test_image(128, 128).save(root / "testimg.png")
    test_image(96, 64, seed=3).save(root / "second.jpg")
    (root / "not_an_image.png").write_text("plain text")
    return root


def run_mask(args: list[str], capsys) -> subprocess.CompletedProcess:
    return run_analysis_cli(["mask", *args], capsys)


def test_seed_001_test_it_now_masks_text_only_and_prints_the_vision_ranges(vl_files, tmp_path, capsys):
    output = tmp_path / "out"
    result = run_mask(
        ["--model", str(vl_files / "vl"), "--image", str(vl_files / "testimg.png"), "--prompt", "What's in this image?",
         "--num-tokens", "3", "--device", "cpu", "--output", str(output)],
        capsys,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((output / "metadata.json").read_text())
    ((start, stop),) = meta["vision"]["token_map"]["ranges"]
    assert stop - start == 16  # 128x128 px -> 4x4 tokens of 32 px
    assert f"Vision token ranges: [({start}, {stop})]" in result.stdout
    assert "Total vision tokens: 16" in result.stdout
    rows = pd.read_csv(output / "masking_results.csv")
    assert set(rows.token_kind) <= {"text", "special"}
    assert not rows.token_position.between(start, stop - 1).any()
    assert (output / "report.html").is_file() and (output / "vision_token_map.json").is_file()
    assert not (output / "vision_report.html").exists()  # no image token was masked


def test_vision_masking_of_two_images_writes_heatmaps_and_the_vision_report(vl_files, tmp_path, capsys):
    output = tmp_path / "out"
    result = run_mask(
        ["--model", str(vl_files / "vl"), "--image", str(vl_files / "testimg.png"), "--image",
         str(vl_files / "second.jpg"), "--prompt", "Test", "--mask", "vision", "--device", "cpu", "--output", str(output)],
        capsys,
    )
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(output / "masking_results.csv")
    assert set(rows.token_kind) == {"image"} and set(rows.image_index) == {0, 1}
    assert len(rows[(rows.layer == 0) & (rows.variant == "Full")]) == 16 + 6
    heatmaps = sorted(p.name for p in (output / "heatmaps").iterdir())
    assert heatmaps == sorted(
        f"image{i}_{stem}.png" for i in (0, 1) for stem in ("layer0", "layer1", "all_layers")
    )
    assert (output / "vision_report.html").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--image", "{root}/missing.png"], "does not exist"),
        (["--image", "{root}/not_an_image.png"], "not an image"),
        (["--mask", "vision"], "--mask vision needs at least one --image"),
        (["--mask", "pixels", "--image", "{root}/testimg.png"], "unknown --mask"),
        (["--vision-attention", "sideways", "--image", "{root}/testimg.png"], "unknown --vision-attention"),
    ],
)
def test_bad_vl_input_is_one_line_exit_2_and_writes_nothing(vl_files, tmp_path, capsys, args, fragment):
    output = tmp_path / "out"
    args = [a.replace("{root}", str(vl_files)) for a in args]
    result = run_mask(["--model", str(vl_files / "vl"), "--prompt", "Hi", "--output", str(output), *args], capsys)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not output.exists()


def test_image_given_to_a_text_only_model_is_one_line_exit_2(vl_files, tmp_path, capsys):
    result = run_mask(
        ["--model", str(vl_files / "text"), "--image", str(vl_files / "testimg.png"), "--prompt", "Hi",
         "--output", str(tmp_path / "out")],
        capsys,
    )
    assert result.returncode == 2 and "text-only model" in result.stderr and len(result.stderr.splitlines()) == 1


def test_text_models_still_run_the_text_command(vl_files, tmp_path, capsys):
    output = tmp_path / "out"
    result = run_mask(
        ["--model", str(vl_files / "text"), "--prompt", "Hi there", "--device", "cpu", "--output", str(output)], capsys
    )
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(output / "masking_results.csv")
    assert "token_kind" not in rows.columns and rows.token_position.nunique() == len("Hi there") + 1


def test_python_dash_m_entry_point_end_to_end(vl_files, tmp_path):
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sparse_viz.analysis", "mask", "--model", str(vl_files / "vl"), "--image",
         str(vl_files / "testimg.png"), "--prompt", "Test", "--mask", "all", "--device", "cpu", "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, cwd=root, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Total vision tokens: 16" in result.stdout
    rows = pd.read_csv(tmp_path / "o" / "masking_results.csv")
    assert set(rows.token_kind) == {"text", "image", "special"}
    assert (tmp_path / "o" / "vision_report.html").is_file()
