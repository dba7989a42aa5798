"""Shared fixtures: the converted SmolLM2-135M checkpoint and tiny saved checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    """One intra-op thread unless SPARSE_VIZ_TEST_THREADS says otherwise.

    The tests run tiny matrices on a 2-core machine shared with other jobs; there, torch's
    OpenMP threads wait on each other at every op (measured: a (5, 576) x (576, 1536) matmul
    took 17 ms with 2 threads under load, 0.5 ms with 1).
    """
    import torch

    torch.set_num_threads(int(os.environ.get("SPARSE_VIZ_TEST_THREADS", "1")))

@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count must not change later tests' floats (the resume
    tests compare in-process runs with 1-thread subprocesses bit for bit)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("SPARSE_VIZ_SMOLLM2_DIR", REPO_ROOT / ".cache" / "smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The HF-format SmolLM2-135M-Instruct made by `scripts/setup.sh --dev`: skipped locally if
    absent, a failure in CI (where `.ci/run` always converts it)."""
    from sparse_viz.pretrained.smollm2 import is_complete

    if not is_complete(SMOLLM2_DIR):
        problem = (f"SmolLM2-135M not converted at {SMOLLM2_DIR}: run "
                   "`python -m sparse_viz.pretrained.smollm2 --output .cache/smollm2-135m` (setup.sh --dev does)")
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny checkpoints {"qwen3": dir, "llama": dir} that `load_model(dir)` accepts."""
    from tiny_models import save_tiny, tiny_llama, tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "qwen3": save_tiny(*tiny_qwen3(), root / "qwen3"),
        "llama": save_tiny(*tiny_llama(), root / "llama"),
    }
