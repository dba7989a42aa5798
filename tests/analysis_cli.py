"""Run `python -m sparse_viz.analysis <command> ...` in-process: exit status and output.

In-process because each subprocess pays seconds of CPU to import torch and transformers; the
`python -m` entry point itself is exercised by a few real subprocess runs elsewhere.
"""

from __future__ import annotations

import subprocess

import pytest


def run_analysis_cli(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """`cli.main(argv)` with its exit status, stdout and stderr, like `subprocess.run`."""
    from sparse_viz.analysis.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)
