"""`python -m sparse_viz.train --help`, and misspelled options, answered without torch or Lightning.

Importing torch and Lightning takes 5-30 s on a CPU machine and building LightningCLI's parser a
few seconds more, while printing the help or naming a misspelled option needs neither. The help
texts of the real parser are kept in `train_help_snapshot.py` (written by
`sparse_viz.train.write_help_snapshot()`), with a fingerprint of everything that shapes them: the
sources of the classes whose options they show, the default config, and the versions of
Lightning, jsonargparse, torch and Python. Where the fingerprint does not match (an edited
checkout, another Lightning) nothing is answered here and the real parser does it all: slower,
never stale.

The misspelling check walks the command line as jsonargparse would, keeping track of the model
and data classes chosen so far (the default config, `--config` files, `--model` / `--data`); an
option of a class it does not know (your own) is left to the real parser.

Nothing here imports more than the standard library and PyYAML.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import re
import sys
from pathlib import Path

PROG = "python -m sparse_viz.train"
PACKAGE = Path(__file__).resolve().parent
DEFAULT_CONFIG = PACKAGE.parent / "configs" / "train" / "default.yaml"
DEFAULT_CONFIG_MARK = "<DEFAULT_CONFIG>"  # the snapshot's stand-in for this checkout's path of it
HELP_FLAGS = ("-h", "--help")
# What the help texts are made of, besides the packages below: the parser's own options and
# the class defaults (train.py), the option names, types and docstrings of the model and data
# classes (ModelConfig's docstring is copied into DSALightningModule's), the classes offered for
# --model / --data / --trainer.callbacks (the packages' __init__, class_choices), and the default
# config.
SHAPED_BY = ("train.py", "training/__init__.py", "training/class_choices.py", "training/module.py",
             "training/retrofit_module.py", "data/__init__.py", "data/datamodule.py", "data/recall_datamodule.py",
             "model/config.py", "tracking/__init__.py", "tracking/callback.py")
DISTRIBUTIONS = ("lightning", "jsonargparse", "torch", "docstring-parser", "typeshed-client")
# keys of a --model / --data option that are not the class's own options
CLASS_KEYS = ("help", "class_path", "init_args", "dict_kwargs")


def fingerprint() -> str:
    """A digest of everything the help texts depend on (see SHAPED_BY, DISTRIBUTIONS)."""
    digest = hashlib.sha256()
    for name in SHAPED_BY:
        path = PACKAGE / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<absent>") + b"\0")
    digest.update(DEFAULT_CONFIG.read_bytes() if DEFAULT_CONFIG.is_file() else b"<no default config>")
    for name in DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "<absent>"
        digest.update(f"\0{name}=={version}".encode())
    digest.update(f"\0python {sys.version_info[0]}.{sys.version_info[1]}".encode())
    return digest.hexdigest()


def current_snapshot() -> dict | None:
    """The snapshot (`texts`: {"": the whole help, class path: that class's help}, `defaults`:
    {"model": class path, "data": class path}), or None where it is missing or stale."""
    try:
        from sparse_viz import train_help_snapshot as snapshot
    except ImportError:
        return None
    if snapshot.FINGERPRINT != fingerprint():
        return None
    texts = {key: text.replace(DEFAULT_CONFIG_MARK, str(DEFAULT_CONFIG)) for key, text in snapshot.TEXTS.items()}
    return {"texts": texts, "defaults": dict(snapshot.DEFAULTS)}


def help_request(argv: list[str], class_paths: list[str]) -> str | None:
    """The help text `argv` asks for, if it asks for nothing else: "" for `--help` alone, a class
    path (given in full or by its class name) for `--model.help CLASS` / `--data.help CLASS`."""
    if len(argv) == 1 and argv[0] in HELP_FLAGS:
        return ""
    words = argv[0].split("=", 1) + argv[1:] if argv else []
    if len(words) == 2 and words[0] in ("--model.help", "--data.help"):
        return resolve_class(words[1], class_paths)
    return None


def resolve_class(name: str, class_paths: list[str]) -> str | None:
    """The class path among `class_paths` that `name` (a class path or a class name) names."""
    found = [path for path in class_paths if name in (path, path.rsplit(".", 1)[-1])]
    return found[0] if len(found) == 1 else None


def listed_options(help_text: str) -> list[str]:
    """The option strings a help text lists (`-c`, `--config`, `--model.top_k`, ...), in order:
    the first words of each line that starts an option's entry (`  -c CONFIG, --config CONFIG`)."""
    found = []
    for line in help_text.splitlines():
        if not re.match(r"^  -", line):
            continue
        invocation = re.split(r"\s{2,}", line.strip())[0]
        found += [part.split()[0] for part in invocation.split(", ") if part.startswith("-")]
    return found


def nearest(option: str, valid: list[str]) -> list[str]:
    """Up to 3 of `valid` that look most like `option` (difflib's ratio >= 0.6)."""
    return difflib.get_close_matches(option, sorted(set(valid)), n=3, cutoff=0.6)


def unknown_option_line(given: str | None, option: str, valid: list[str], prefix: str = "",
                        owner: str | None = None) -> str:
    """One line for an option the parser does not take, naming its nearest valid names.

    Args:
        given: what was written (`--model.topk=16`), or None when it came from a config file.
        option: the unknown name (`topk`).
        valid: the names that would have been accepted at its place (`top_k`, `d_model`, ...).
        prefix: what the names follow (`--model.`, `--trainer.`, `--`).
        owner: the class that has no such option, if it belongs to one.
    """
    close = nearest(option, valid)
    where = f"{owner} has no option {option}; " if owner else ""
    if close:
        advice = "did you mean " + " or ".join(prefix + name for name in close) + "?"
    elif owner:
        advice = f"its options: {PROG} {prefix}help {owner}"
    else:
        advice = f"the options: {PROG} --help"
    what = f"unrecognized arguments: {given}" if given else f"unknown option {prefix.lstrip('-')}{option} in a config"
    return f"{what} ({where}{advice})"


def _config_classes(path: str, classes: dict[str, str | None], class_paths: list[str]) -> bool:
    """Update `classes` with the class paths a config file chooses; False if it cannot be read
    (the real parser then says why)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(config, dict):
        return False
    for key in ("model", "data"):
        value = config.get(key)
        if isinstance(value, dict) and "class_path" in value:
            value = value["class_path"]
        if isinstance(value, str):
            classes[key] = resolve_class(value, class_paths)
        elif value is not None and not isinstance(value, dict):
            classes[key] = None
    return True


def misspelled_option(argv: list[str], snapshot: dict) -> str | None:
    """One line for the first option on the command line that the parser would not take, or None.

    Only names are checked (values are the parser's business); `--optimizer.*` and
    `--lr_scheduler.*` (torch's classes) and the options of a class not in the snapshot pass.
    """
    texts = snapshot["texts"]
    class_paths = [key for key in texts if key]
    main = [option for option in listed_options(texts[""]) if option.startswith("--")]
    top = sorted({option[2:].split(".")[0].rstrip("+") for option in main})
    trainer = sorted({option.split(".")[1].rstrip("+") for option in main if option.startswith("--trainer.")})
    classes: dict[str, str | None] = dict(snapshot["defaults"])
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        name, has_value, value = arg.partition("=")
        if not has_value and i < len(argv) and not argv[i].startswith("-"):
            value = argv[i]
        if name == "-c" or name == "--config":
            if not _config_classes(value, classes, class_paths):
                return None
            continue
        if not arg.startswith("--"):
            continue
        parts = name[2:].split(".")
        head = parts[0]
        if head not in top:
            return unknown_option_line(arg, head, top, prefix="--")
        if head == "trainer" and len(parts) > 1 and parts[1].rstrip("+") not in trainer:
            return unknown_option_line(arg, parts[1], trainer, prefix="--trainer.")
        if head not in ("model", "data"):
            continue
        if len(parts) == 1 or parts[1] == "class_path":
            classes[head] = resolve_class(value, class_paths)
            continue
        key = parts[2] if parts[1] == "init_args" and len(parts) > 2 else parts[1]
        key = key.rstrip("+")
        owner = classes[head]
        if key in CLASS_KEYS or owner is None:
            continue
        options = [option.split(".")[1] for option in listed_options(texts[owner]) if option.startswith(f"--{head}.")]
        if key not in options:
            return unknown_option_line(arg, key, options, prefix=f"--{head}.", owner=owner)
    return None


def answer_without_lightning(argv: list[str]) -> None:
    """Print the help `argv` asks for (exit 0), or the line for a misspelled option (exit 2),
    from a current snapshot; return (and let the real parser work) otherwise."""
    snapshot = current_snapshot()
    if snapshot is None:
        return
    request = help_request(argv, [key for key in snapshot["texts"] if key])
    if request is not None:
        sys.stdout.write(snapshot["texts"][request])
        sys.exit(0)
    line = misspelled_option(argv, snapshot)
    if line is not None:
        print(f"sparse_viz.train: error: {line}", file=sys.stderr)
        sys.exit(2)
