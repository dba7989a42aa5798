"""A sparse stage whose top_k reaches the sequence length is dense attention: the training command
says so (one warning line) instead of training a dense model under a sparse name in silence.

The boundary is checked against the selectors themselves: with top_k >= T every query's selection
holds all its past keys, with top_k = T - 1 the last query's does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sparse_viz.model.selectors import select_keys
from sparse_viz.train import SparseVizCLI, cli_kwargs

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml")  # seq_len 64, top_k 8


def every_query_keeps_all_its_past_keys(selector: str, top_k: int, seq_len: int) -> bool:
    """Whether the selector's selection is dense at every row (brute force over rows)."""
    chosen = select_keys(selector, top_k=top_k, seq_len=seq_len, seed=0, batch_size=1)[0]  # (T, k), -1 pads
    return all(set(chosen[t].tolist()) - {-1} == set(range(t + 1)) for t in range(seq_len))


@pytest.mark.parametrize("selector", ["local", "random"])
def test_the_warnings_boundary_is_where_selections_become_dense(selector):
    assert every_query_keeps_all_its_past_keys(selector, top_k=64, seq_len=64)
    assert every_query_keeps_all_its_past_keys(selector, top_k=1000, seq_len=64)
    assert not every_query_keeps_all_its_past_keys(selector, top_k=63, seq_len=64)


class Parsed(Exception):
    """Raised once the command line is parsed and checked: no data, model or run directory."""


class ParseOnly(SparseVizCLI):
    def before_instantiate_classes(self) -> None:
        raise Parsed()


def warnings_of(args: list[str], capsys, monkeypatch) -> list[str]:
    """The lines the training command writes about itself on stderr while it parses `args`."""
    monkeypatch.delenv("SPARSE_VIZ_RUN_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["sparse_viz.train"])  # pytest's own arguments are not the command's
    capsys.readouterr()
    with pytest.raises(Parsed):
        ParseOnly(**cli_kwargs(["--config", TINY, *args]))
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparse_viz.train:")]


@pytest.mark.parametrize("args, expected", [
    (["--model.top_k=64"], "model.top_k=64 >= data.seq_len=64"),
    (["--model.top_k=1000"], "model.top_k=1000 >= data.seq_len=64"),
    (["--model.top_k=100", "--model.selector=local"], "model.top_k=100 >= data.seq_len=64"),
    (["--model.top_k=63"], None),  # the last query keeps 63 of its 64 keys: sparse
    (["--model.top_k=64", "--model.selector=dense"], None),  # dense by choice
    (["--model.top_k=64", "--model.stages=[{name: dense, steps: 5}, {name: warmup, steps: 5}]"], None),  # no sparse stage
    # the recall data module: its seq_len, with a curriculum that is shorter still
    (["--data", "sparse_viz.data.RecallDataModule", "--data.seq_len=32", "--data.curriculum=[[16, 10]]",
      "--model.top_k=32"], "model.top_k=32 >= data.seq_len=32"),
    (["--data", "sparse_viz.data.RecallDataModule", "--data.seq_len=48", "--data.curriculum=[[16, 10]]",
      "--model.top_k=32"], None),  # dense while T = 16 only, by the curriculum's design
])
def test_a_top_k_that_reaches_the_sequence_length_is_one_warning_line(args, expected, capsys, monkeypatch):
    lines = warnings_of(args, capsys, monkeypatch)
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1, lines
        assert lines[0].startswith("sparse_viz.train: warning: ") and expected in lines[0], lines[0]
        assert "dense attention" in lines[0]


def test_processes_started_for_other_devices_do_not_repeat_the_warning(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_VIZ_RUN_DIR", str(tmp_path))  # what Lightning's DDP launcher's processes inherit
    monkeypatch.setattr(sys, "argv", ["sparse_viz.train"])
    capsys.readouterr()
    with pytest.raises(Parsed):
        ParseOnly(**cli_kwargs(["--config", TINY, "--model.top_k=64"]))
    assert "sparse_viz.train: warning" not in capsys.readouterr().err
