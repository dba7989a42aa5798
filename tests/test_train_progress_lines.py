"""A training run whose output goes to a file or a pipe writes plain progress lines as it goes.

Lightning's progress bar is drawn for a terminal; into a pipe rich draws it once, at the end. The
run here writes into a pipe that the test reads while the run is still going (each line must be
flushed when written), and the lines are checked against the run's own record: the stage of
each step from tiny.yaml's schedule, the loss against metrics.csv at the same update.
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_viz.training.progress import line_interval

TESTS = Path(__file__).resolve().parent
TINY = str(TESTS.parent / "configs" / "train" / "tiny.yaml")
STAGES = ["dense"] * 10 + ["warmup"] * 5 + ["sparse"] * 10  # tiny.yaml: the stage of update i (0-based)
LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\), stage (\w+): loss ([\d.]+), ([\d.]+) tokens/s$")


@pytest.mark.slow
def test_a_run_into_a_pipe_writes_a_line_every_tenth_of_its_steps_while_it_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    env.pop("SPARSE_VIZ_RUN_DIR", None)
    command = [sys.executable, "-m", "sparse_viz.train", "--config", TINY, "--run_root", str(tmp_path / "runs"),
               "--run_name", "piped", f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.log_every_n_steps=1",
               "--trainer.callbacks=[]",
               # 0.2 s more per step: the run outlasts the first line by seconds, however loaded the machine
               "--trainer.callbacks+=test_train_interrupt.Slow", "--trainer.callbacks.seconds=0.2"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines, running_at_first_line = [], None
    for line in process.stdout:
        line = line.rstrip()
        lines.append(line)
        if running_at_first_line is None and LINE.match(line):
            running_at_first_line = process.poll() is None
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr[-3000:]
    assert running_at_first_line, "no progress line came before the run ended:\n" + "\n".join(lines)

    progress = [LINE.match(line).groups() for line in lines if LINE.match(line)]
    steps = [int(step) for step, *_ in progress]
    # 25 steps: a line every ceil(25 / 10) = 3 steps, and at the last
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24, 25], lines
    assert all(int(total) == 25 for _, total, *_ in progress)
    with open(tmp_path / "runs" / "piped" / "metrics.csv", newline="") as handle:
        logged = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    for step, _, stage, loss, tokens_per_s in progress:
        step = int(step)
        assert stage == STAGES[step - 1], (step, stage)  # the stage of the update that made step `step`
        assert float(loss) == pytest.approx(logged[step - 1], abs=5e-5)  # metrics.csv counts updates from 0
        assert float(tokens_per_s) > 0 and math.isfinite(float(tokens_per_s))
    # after each validation (tiny.yaml: every 10 steps), its loss
    validations = [line for line in lines if line.startswith("validation at step ")]
    assert [line.split(":")[0] for line in validations] == ["validation at step 10/25", "validation at step 20/25"]
    assert all("val/loss " in line for line in validations)


@pytest.mark.parametrize("max_steps, expected", [(25, 3), (800, 50), (300, 30), (10_000, 50), (7, 1), (-1, 50)])
def test_lines_come_every_tenth_of_the_run_and_at_most_50_steps_apart(max_steps, expected):
    assert line_interval(max_steps) == expected
