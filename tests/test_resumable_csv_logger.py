"""`ResumableCSVLogger` on files a killed run can leave: hand-written CSVs as the reference."""

from __future__ import annotations

import csv

import pytest

from sparse_viz.training.resumable_csv_logger import ResumableCSVLogger

HEADER = "epoch,step,train/loss,val/loss\n"
ROWS = ["0,4,2.5,\n", "0,9,2.25,\n", "0,9,,2.75\n", "0,14,2.0,\n"]


def read(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def logger_on(tmp_path, text: str, resume_step: int | None) -> ResumableCSVLogger:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(text)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="run", version="", resume_step=resume_step)
    logger.experiment  # opens the file as a run starting (or resuming) does
    return logger


def test_resume_keeps_rows_before_the_step_and_drops_a_row_cut_short_by_a_kill(tmp_path):
    # killed while appending the step-19 row: only "0,1" of "0,19,1.5," reached the disk
    logger = logger_on(tmp_path, HEADER + "".join(ROWS) + "0,1", resume_step=15)
    rows = read(tmp_path / "run" / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("4", "2.5", ""), ("9", "2.25", ""), ("9", "", "2.75"), ("14", "2.0", "")]
    logger.log_metrics({"train/loss": 1.25}, step=19)
    logger.save()
    assert [r["step"] for r in read(tmp_path / "run" / "metrics.csv")] == ["4", "9", "9", "14", "19"]


def test_a_new_column_rewrites_the_file_through_a_temporary_copy(tmp_path, monkeypatch):
    logger = logger_on(tmp_path, HEADER + "".join(ROWS), resume_step=20)
    before = (tmp_path / "run" / "metrics.csv").read_text()

    def killed(self, rows):  # the process dies while the rewritten rows are being written
        raise SystemExit("killed")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    logger.log_metrics({"val/accuracy": 0.5}, step=19)  # a new column: the header changes
    with pytest.raises(SystemExit):
        logger.save()
    assert (tmp_path / "run" / "metrics.csv").read_text() == before  # the history is whole


def test_a_new_run_warns_about_deleting_metrics_only_when_there_are_some(tmp_path):
    """A fresh run's directory already holds config.yaml: no "previous log files will be deleted"
    warning for that; a new run over an old run's metrics.csv is still warned, and starts clean."""
    import warnings

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("seed_everything: 0\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ResumableCSVLogger(save_dir=str(tmp_path), name="fresh", version="").experiment
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    assert (fresh / "config.yaml").is_file()

    with pytest.warns(UserWarning, match="will be deleted"):
        logger_on(tmp_path, HEADER + "".join(ROWS), resume_step=None)
    assert not (tmp_path / "run" / "metrics.csv").exists()
