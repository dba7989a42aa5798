"""Output folders that appear whole or not at all, and never destroy what a user already has.

Every command that writes a folder of results (the analyses, batch mode, the experiments' scripts)
goes through `write_output_dir`:

- the folder is written into a staging folder beside it and moved in with renames at the end,
  so a failure leaves no half-written output;
- a folder this project wrote carries a manifest, `.sparse_viz-output.json`, listing every file
  it wrote; only such a folder is ever replaced, only with consent (`overwrite=True`,
  `--overwrite` on the command line), and only while it holds nothing but the files its manifest
  lists (a notes file a user added makes it irreplaceable);
- anything else that exists and is not empty (a user's folder, `results/` with its training
  runs, a folder of an older version without a manifest) is refused, before any model loads.

Why a manifest and not "looks like ours" (a metadata.json, a report.html): a user's folder can
hold such names too, and the rule has to be sure before it deletes anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparse_viz.errors import UserInputError

MANIFEST_NAME = ".sparse_viz-output.json"


def default_output_dir(command: str, root: str | os.PathLike = "results") -> Path:
    """A new folder `<root>/<command>-<YYYYmmdd-HHMMSS>` (suffixed -2, -3, ... if taken): the
    default output of a command, so that running it twice keeps both results."""
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, suffix = Path(root) / name, 1
    while candidate.exists():
        suffix += 1
        candidate = Path(root) / f"{name}-{suffix}"
    return candidate


def refuse_existing_dirs(folders, what: str = "run directories") -> None:
    """Refuse to start work that would write into folders that already hold files (an
    experiment's earlier training runs, say), naming them all at once, before any work starts.

    Raises:
        UserInputError: one or more of `folders` exist and are not empty.
    """
    taken = [str(folder) for folder in map(Path, folders) if folder.is_dir() and any(folder.iterdir())]
    if taken:
        raise UserInputError(f"{what} already exist: {', '.join(taken)}; nothing was changed: "
                             "move or remove them to run again")


def files_under(folder: Path) -> list[str]:
    """Every file and link under `folder`, as sorted POSIX paths relative to it (folders are not
    listed: an empty folder holds nothing to lose)."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_symlink() or not path.is_dir()
    )


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a folder this project wrote, or None (absent, unreadable, malformed)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def foreign_files(folder: Path) -> list[str] | None:
    """The files under `folder` that its manifest does not list; None if it has no manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    ours = set(manifest["files"]) | {MANIFEST_NAME}
    return [name for name in files_under(folder) if name not in ours]


def check_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any model loads) unless `output` may be written.

    Writable: a path that does not exist, an empty folder, or (with `overwrite`) a folder this
    project wrote that holds only the files its manifest lists.

    Args:
        output: the output folder.
        overwrite: consent to replace an earlier result of this project.

    Returns:
        The output path (not created; results are written to a sibling staging folder).

    Raises:
        UserInputError: the path is a file; a folder holding files this project did not write;
            an earlier result without `overwrite`; a parent that cannot be created or written.
    """
    path = Path(output)
    check_replaceable(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}."):
            pass
    except OSError as error:
        raise UserInputError(f"cannot write output directory {str(path)!r}: {error.strerror or error}") from error
    return path


def check_replaceable(path: Path, overwrite: bool) -> None:
    """What `path` holds allows it to be written (see `check_output_dir`); says nothing about
    whether its parent can be written.

    Raises:
        UserInputError: as `check_output_dir`, but for the parent.
    """
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output {str(path)!r} exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    foreign = foreign_files(path)
    if foreign is None:
        raise UserInputError(
            f"output {str(path)!r} is a folder sparse_viz did not write (no {MANIFEST_NAME}); "
            "nothing was changed: choose a new or empty folder"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserInputError(
            f"output {str(path)!r} holds files sparse_viz did not write ({shown}); "
            "nothing was changed: choose a new or empty folder"
        )
    if not overwrite:
        raise UserInputError(
            f"output {str(path)!r} already holds an earlier result; pass --overwrite to replace it, "
            "or choose another folder"
        )


def make_staging_dir(output: Path) -> Path:
    """An empty, ordinarily permissioned folder beside `output` to write results into.

    Raises:
        UserInputError: the output location cannot be written.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as error:
        raise UserInputError(f"cannot write output directory {str(output)!r}: {error.strerror or error}") from error
    return staging


def write_manifest(folder: Path, written_by: str) -> None:
    """List every file under `folder` in its manifest: what may be replaced later."""
    manifest = {"written_by": written_by, "files": files_under(folder)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def replace_dir(staging: Path, output: Path) -> None:
    """Move `staging` to `output`; an existing (already checked) folder is moved aside first and
    removed after, so that `output` is always the old folder or the new one."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def write_output_dir(output: str | os.PathLike, *, written_by: str, overwrite: bool = False) -> Iterator[Path]:
    """Write a result folder whole: yields a staging folder; on success it gets its manifest and
    replaces `output`, on an exception it is removed and `output` is untouched.

    The check of `check_output_dir` runs on entry, and what the folder holds is checked again just
    before the rename: files a user put into it while the analysis ran are still refused (the
    staging folder beside it has shown the parent can be written).

    Args:
        output: the result folder.
        written_by: what wrote it (a command or function name), recorded in the manifest.
        overwrite: consent to replace an earlier result of this project.

    Raises:
        UserInputError: see `check_output_dir`.
    """
    output = check_output_dir(output, overwrite=overwrite)
    staging = make_staging_dir(output)
    try:
        yield staging
        write_manifest(staging, written_by)
        check_replaceable(output, overwrite)
        replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
