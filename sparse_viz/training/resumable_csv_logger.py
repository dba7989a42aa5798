"""A CSVLogger that a resumed run appends to, instead of deleting the run's `metrics.csv`.

Lightning's CSV writer removes an existing `metrics.csv` when it starts (and warns). On resume
from a checkpoint at global step S, this logger keeps the rows logged before S, drops the rows
at or after S (they will be logged again), and appends from there.

Lightning rewrites the whole file in place when a new column appears (a first validation, a new
metric); a process killed during that rewrite would lose the history. Here the rewrite goes to a
temporary file that replaces the old one, so the file is always complete. (A kill during an
append can leave a partial last row: it is after the last checkpoint, so a resume drops it.)
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            # Nothing to delete: Lightning would still warn that "previous log files will be
            # deleted" because the run directory already holds config.yaml and tokenizer.json.
            return
        if self._resume_step is None:  # a new run over an old one's metrics: Lightning warns, then deletes
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as handle:
            reader = csv.DictReader(handle)
            fieldnames = list(reader.fieldnames or [])
            # A row cut short by a kill has None for its missing fields (its step may be cut too).
            kept = [row for row in reader if None not in row.values() and None not in row
                    and row.get("step") and int(float(row["step"])) < self._resume_step]
        self.metrics_keys = sorted(fieldnames)
        _write_rows_atomic(self.metrics_file_path, self.metrics_keys, kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        _write_rows_atomic(self.metrics_file_path, fieldnames, rows)


def _write_rows_atomic(path: str, fieldnames: list[str], rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that keeps the history of a run resumed at `resume_step` (None: a fresh run)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment
