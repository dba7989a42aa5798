"""The run store: what the selection callback writes to disk and the report reads back.

Layout inside a run directory (DESIGN.md "Data that crosses boundaries"):

    analysis/history.jsonl       one JSON object of scalars per snapshot, ordered by step
    analysis/step_XXXXXXX.npz    the arrays of one snapshot (7-digit zero-padded step)
    analysis/probe.json          the fixed probe: token ids and strings, k, layer count, ...

Every write is atomic (temp file in the same folder + `os.replace`). A snapshot's npz is
written before its history line, and the history is the source of truth: a run killed between
the two leaves an npz without a line, which the resumed run rewrites; a step already in the
history is never written again, so a resumed run has exactly one line per snapshot step.

numpy + json only (no torch): `python -m sparse_viz.report RUN_DIR` uses it without the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ANALYSIS_DIR = "analysis"
HISTORY_FILE = "history.jsonl"
PROBE_FILE = "probe.json"


def snapshot_name(step: int) -> str:
    return f"step_{int(step):07d}.npz"


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """Python scalars for JSON; NaN/inf become None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunStore:
    """Reads and writes the `analysis/` folder of one run directory.

    Args:
        run_dir: the run directory (`results/<run>/`, the trainer's `default_root_dir`).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.analysis_dir = self.run_dir / ANALYSIS_DIR
        self.history_path = self.analysis_dir / HISTORY_FILE
        self.probe_path = self.analysis_dir / PROBE_FILE

    # -- history -------------------------------------------------------------------------------
    def read_history(self) -> list[dict]:
        """All snapshot records, in file order (ascending step). Missing file: []."""
        if not self.history_path.is_file():
            return []
        records = []
        for number, line in enumerate(self.history_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.history_path}:{number}: not a JSON line ({error.msg})") from None
        return records

    def steps(self) -> list[int]:
        return [int(record["step"]) for record in self.read_history()]

    def has_step(self, step: int) -> bool:
        return int(step) in set(self.steps())

    def append(self, record: dict, arrays: dict[str, np.ndarray] | None = None) -> bool:
        """Store one snapshot: its arrays (npz) first, then its history line.

        Args:
            record: JSON-able scalars; must hold an integer `step`.
            arrays: named numpy arrays for `step_XXXXXXX.npz` (None: no npz).

        Returns:
            True if written, False if the history already had this step (nothing is touched).
        """
        step = int(record["step"])
        history = self.read_history()
        if any(int(r["step"]) == step for r in history):
            return False
        if arrays is not None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            _write_bytes_atomic(self.analysis_dir / snapshot_name(step), buffer.getvalue())
        history.append(_jsonable(dict(record, step=step)))
        history.sort(key=lambda r: int(r["step"]))
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in history)
        _write_bytes_atomic(self.history_path, text.encode("utf-8"))
        return True

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot_path(self, step: int) -> Path:
        return self.analysis_dir / snapshot_name(step)

    def load_snapshot(self, step: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of one snapshot (loaded eagerly; the file is closed on return); with `names`,
        only those (an npz member is read only when asked for)."""
        with np.load(self.snapshot_path(step), allow_pickle=False) as archive:
            return {name: archive[name] for name in (archive.files if names is None else names)}

    # -- probe ---------------------------------------------------------------------------------
    def write_probe(self, probe: dict) -> None:
        """Write `probe.json` (token ids/strings of the probe, k, layers, ...) atomically."""
        text = json.dumps(_jsonable(probe), ensure_ascii=False, allow_nan=False)
        _write_bytes_atomic(self.probe_path, text.encode("utf-8"))

    def read_probe(self) -> dict:
        return json.loads(self.probe_path.read_text(encoding="utf-8"))

    def exists(self) -> bool:
        return self.history_path.is_file()
