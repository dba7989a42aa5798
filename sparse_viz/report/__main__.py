"""`python -m sparse_viz.report RUN_DIR`: re-render a training run's plots and report from disk.

Reads `RUN_DIR/analysis/` (history.jsonl, step_*.npz, probe.json) and writes
`RUN_DIR/plots/*.png`, `RUN_DIR/plots/selection/step_*.png` and `RUN_DIR/report.html`.
A snapshot's selection heatmap is drawn when it is missing or older than the snapshot, with every
layer; `--heatmap-layers 0,3` redraws every snapshot's heatmap with exactly those layers.
Needs neither torch nor the model. Bad input (missing directory, no history, a layer the run
does not have) is one line on stderr and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse

from sparse_viz.errors import UserInputError, exit_on_user_error

PROG = "python -m sparse_viz.report"


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--heatmap-layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise UserInputError(f"--heatmap-layers names no layer, got {text!r}")
    return list(dict.fromkeys(layers))  # "0,0" is one panel, not two


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (results/<run>/) with analysis/history.jsonl")
    parser.add_argument("--heatmap-layers", default=None, metavar="LAYERS",
                        help="comma-separated layers, e.g. 0,3: redraw every snapshot's selection heatmap "
                             "(plots/selection/step_*.png) with one panel per listed layer, also where one exists; "
                             "each file then shows only these layers (no file is deleted). Without it, only missing "
                             "or out-of-date heatmaps are drawn, with every layer")
    parser.add_argument("--no-plots", action="store_true", help="only re-render report.html")
    args = parser.parse_args(argv)
    layers = _parse_layers(args.heatmap_layers)
    if layers is not None and args.no_plots:
        raise UserInputError("--heatmap-layers draws heatmaps and --no-plots skips them: give one or the other")

    from sparse_viz.report.training import render_run, render_training_report

    if args.no_plots:
        written = [render_training_report(args.run_dir)]
    else:
        # An explicit choice of layers takes effect on a run whose heatmaps exist already.
        written = render_run(args.run_dir, heatmap_layers=layers, redraw_heatmaps=layers is not None)
    for path in written:
        print(path)


if __name__ == "__main__":
    exit_on_user_error(main, PROG)
