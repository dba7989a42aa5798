"""The run store: atomic files, one history line per step, resume never writes a step twice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparse_viz.tracking.store import RunStore, snapshot_name


def test_append_writes_npz_and_one_line_per_step(tmp_path):
    store = RunStore(tmp_path)
    assert store.read_history() == [] and store.steps() == []
    assert store.append({"step": 0, "mass_at_k": 0.5}, {"selected": np.arange(6).reshape(2, 3)})
    assert store.append({"step": 50, "mass_at_k": float("nan")}, {"selected": np.zeros((2, 3))})
    lines = (tmp_path / "analysis" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 50]
    assert json.loads(lines[1])["mass_at_k"] is None  # NaN is not JSON: stored as null
    assert (tmp_path / "analysis" / "step_0000050.npz").is_file()
    assert store.load_snapshot(0)["selected"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_step_already_in_the_history_is_never_written_again(tmp_path):
    store = RunStore(tmp_path)
    store.append({"step": 10, "value": 1.0}, {"a": np.ones(2)})
    before = store.snapshot_path(10).read_bytes()
    assert not store.append({"step": 10, "value": 2.0}, {"a": np.zeros(2)})
    assert store.read_history() == [{"step": 10, "value": 1.0}]
    assert store.snapshot_path(10).read_bytes() == before
    # a fresh store object (a resumed process) sees the same history
    assert not RunStore(tmp_path).append({"step": 10, "value": 3.0})
    assert RunStore(tmp_path).steps() == [10]


def test_an_npz_without_a_history_line_is_rewritten(tmp_path):
    """A run killed between the npz and the history line: the resumed run records the step."""
    store = RunStore(tmp_path)
    store.snapshot_path(20).parent.mkdir(parents=True)
    store.snapshot_path(20).write_bytes(b"half-written garbage")
    assert store.append({"step": 20}, {"a": np.arange(3)})
    assert store.load_snapshot(20)["a"].tolist() == [0, 1, 2]
    assert store.steps() == [20]


def test_no_temporary_files_are_left_behind(tmp_path):
    store = RunStore(tmp_path)
    for step in (0, 5, 10):
        store.append({"step": step}, {"a": np.arange(step + 1)})
    store.write_probe({"tokens": ["a", "</script>"]})
    names = sorted(p.name for p in (tmp_path / "analysis").iterdir())
    assert names == ["history.jsonl", "probe.json", snapshot_name(0), snapshot_name(5), snapshot_name(10)]
    assert store.read_probe()["tokens"][1] == "</script>"


def test_a_corrupt_history_line_names_the_file_and_line(tmp_path):
    store = RunStore(tmp_path)
    store.append({"step": 0})
    with store.history_path.open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ValueError, match=r"history.jsonl:2"):
        store.read_history()


def test_history_stays_ordered_by_step_when_an_earlier_step_arrives_late(tmp_path):
    """A resumed run with a different snapshot period can fill in a step below the last one."""
    store = RunStore(tmp_path)
    for step in (0, 20, 10):
        assert store.append({"step": step})
    lines = store.history_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 10, 20]
