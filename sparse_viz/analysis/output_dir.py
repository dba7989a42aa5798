"""Output folders that appear whole or not at all: checked before a model loads, written into a
staging folder beside the target, and moved in with renames at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sparse_viz.errors import UserInputError


def check_output_dir(output: str | os.PathLike) -> Path:
    """Fail early (before any model loads) if `output` cannot be created or written.

    Returns:
        The output path (not created; results are written to a sibling temp dir and moved in).

    Raises:
        UserInputError: the path is a file, or its parent cannot be created or written.
    """
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output {str(path)!r} exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}."):
            pass
    except OSError as error:
        raise UserInputError(f"cannot write output directory {str(path)!r}: {error.strerror or error}") from error
    return path


def make_staging_dir(output: Path) -> Path:
    """An empty, ordinarily permissioned folder beside `output` to write results into.

    Raises:
        UserInputError: the output location cannot be written.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    except OSError as error:
        raise UserInputError(f"cannot write output directory {str(output)!r}: {error.strerror or error}") from error
    return staging


def replace_dir(staging: Path, output: Path) -> None:
    """Move `staging` to `output`, replacing an existing directory with two renames."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)
