"""Atomic cache files: a killed process never leaves a half-written file behind.

Every write goes to a temporary file in the destination folder and is renamed over the final
name (`os.replace` is atomic on one filesystem), so a reader sees the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def settings_key(**settings: object) -> str:
    """A short stable hex key of keyword settings (sorted JSON, sha256, first 16 hex digits)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and rename the temporary file to `path`.

    Args:
        path: the final file.
        write: writes the full content to the path it is given.

    Returns:
        `path`. On any error the temporary file is removed and `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_array_atomic(path: Path, array: np.ndarray) -> Path:
    """Save one array as `.npy` atomically (`path` must end in .npy)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return write_atomic(path, write)
