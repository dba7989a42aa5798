"""`python -m sparse_viz.analysis <command> ...` (see `sparse_viz.analysis.cli`)."""

from sparse_viz.analysis.cli import main

if __name__ == "__main__":
    main()
