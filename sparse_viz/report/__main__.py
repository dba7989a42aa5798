"""`python -m sparse_viz.report RUN_DIR`: re-render a training run's plots and report from disk.

Reads `RUN_DIR/analysis/` (history.jsonl, step_*.npz, probe.json) and writes
`RUN_DIR/plots/*.png`, `RUN_DIR/plots/selection/step_*.png` and `RUN_DIR/report.html`.
Needs neither torch nor the model. Bad input (missing directory, no history) is one line on
stderr and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse

from sparse_viz.errors import UserInputError, exit_on_user_error

PROG = "python -m sparse_viz.report"


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--heatmap-layers must be comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (results/<run>/) with analysis/history.jsonl")
    parser.add_argument("--heatmap-layers", default=None,
                        help="comma-separated layers for the per-snapshot selection heatmaps (default: all)")
    parser.add_argument("--no-plots", action="store_true", help="only re-render report.html")
    args = parser.parse_args(argv)
    layers = _parse_layers(args.heatmap_layers)

    from sparse_viz.report.training import render_run, render_training_report

    if args.no_plots:
        written = [render_training_report(args.run_dir)]
    else:
        written = render_run(args.run_dir, heatmap_layers=layers)
    for path in written:
        print(path)


if __name__ == "__main__":
    exit_on_user_error(main, PROG)
