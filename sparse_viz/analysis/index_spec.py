"""Index specs such as "0,3,5-9" or "-1": which layers, positions or components a probe covers."""

from __future__ import annotations

import re
from collections.abc import Sequence

from sparse_viz.errors import UserInputError

_INDEX_ITEM = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")  # N or N-M, each possibly negative


def parse_index_spec(spec: str | None, size: int, what: str = "layers") -> list[int] | None:
    """Parse "0,3,5-9" (inclusive ranges) into sorted unique indices below `size`.

    Negative numbers count from the end, as in Python: "-1" is size - 1, "-4--1" the last four.

    Args:
        spec: the text; None or "all" means every index (returns None).
        size: number of valid indices (0..size-1).
        what: name used in error messages ("layers", "positions").

    Raises:
        UserInputError: malformed item, reversed range, or index out of range.
    """
    if spec is None or spec.strip().lower() == "all":
        return None
    indices: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        match = _INDEX_ITEM.match(item)
        if not match:
            raise UserInputError(f"bad --{what} spec {spec!r}: {item!r} is not N or N-M")
        start = int(match.group(1))
        end = start if match.group(2) is None else int(match.group(2))
        start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
        if start > end:
            raise UserInputError(f"bad --{what} spec {spec!r}: range {item!r} is reversed")
        if start < 0 or end >= size:
            raise UserInputError(f"bad --{what} spec {spec!r}: {item!r} is outside 0-{size - 1}")
        indices.update(range(start, end + 1))
    return sorted(indices)


def as_indices(spec: str | Sequence[int] | None, size: int, what: str) -> list[int] | None:
    """A spec text (see `parse_index_spec`) or a list of indices, checked; None = all.

    Raises:
        UserInputError: a malformed spec or an index outside 0..size-1.
    """
    if spec is None or isinstance(spec, str):
        return parse_index_spec(spec, size, what)
    indices = sorted({int(i) for i in spec})
    if any(i < 0 or i >= size for i in indices):
        raise UserInputError(f"bad {what}: {list(spec)} has indices outside 0-{size - 1}")
    return indices
