"""One-line errors for an unknown class path in the training command line or its config.

jsonargparse reports `--data sparse_viz.data.NoSuch` as a paragraph about Union subtypes that
never says what would have worked. `unknown_class_error` turns that into one line naming the
valid classes of the option: the data modules of `sparse_viz.data`, the LightningModules of
`sparse_viz.training`, the callbacks of `sparse_viz.tracking` and `lightning.pytorch.callbacks`.
"""

from __future__ import annotations

import importlib
import inspect
import re

# option key -> (what it is, [(package, base class path)] whose public subclasses are the choices)
_CHOICES = {
    "data": ("data module", [("sparse_viz.data", "lightning.pytorch.LightningDataModule")]),
    "model": ("model", [("sparse_viz.training", "lightning.pytorch.LightningModule")]),
    "trainer.callbacks": ("callback", [("sparse_viz.tracking", "lightning.pytorch.Callback"),
                                       ("lightning.pytorch.callbacks", "lightning.pytorch.Callback")]),
}
_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN = [re.compile(r"Problem with given class_path '([^']+)'"),
          re.compile(r"Expected a dot import path string: (\S+)"),
          re.compile(r"Expected a path but (\S+) either not accessible")]


def class_choices(key: str) -> list[str]:
    """The class paths option `key` accepts from this project and Lightning (sorted per package).

    Args:
        key: `data`, `model` or `trainer.callbacks`.

    Returns:
        Dotted paths such as `sparse_viz.data.TextDataModule`; [] for another key.
    """
    found = []
    for package, base_path in _CHOICES.get(key, ("", []))[1]:
        module = importlib.import_module(package)
        base_module, base_name = base_path.rsplit(".", 1)
        base = getattr(importlib.import_module(base_module), base_name)
        names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
        found += sorted(f"{package}.{name}" for name in names
                        if inspect.isclass(obj := getattr(module, name, None)) and issubclass(obj, base)
                        and obj is not base and not inspect.isabstract(obj))
    return found


def unknown_class_error(message: str) -> str | None:
    """One line for a parser error about an unknown class path, or None if it is not one.

    Args:
        message: the text of jsonargparse's error.

    Returns:
        `unknown <what> 'X' for --<key>; choose one of A, B, ...`, or None.
    """
    key = _KEY.search(message)
    if key is None or key.group(1) not in _CHOICES:
        return None
    for pattern in _GIVEN:
        given = pattern.search(message)
        if given is not None:
            break
    else:
        return None
    if _importable(given.group(1)):
        return None  # a known class with a bad option: jsonargparse's message says which
    what = _CHOICES[key.group(1)][0]
    return f"unknown {what} '{given.group(1)}' for --{key.group(1)}; choose one of {_compact(class_choices(key.group(1)))}"


def _compact(paths: list[str]) -> str:
    """Full paths, but `a.{B, C, D, E}` for a package with more than 3: Lightning's callbacks
    alone would fill a line."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        package, name = path.rsplit(".", 1)
        groups.setdefault(package, []).append(name)
    return ", ".join(", ".join(f"{package}.{name}" for name in names) if len(names) <= 3
                     else f"{package}.{{{', '.join(names)}}}" for package, names in groups.items())


def _importable(path: str) -> bool:
    module, _, name = path.rpartition(".")
    try:
        return bool(module) and inspect.isclass(getattr(importlib.import_module(module), name, None))
    except ImportError:
        return False
