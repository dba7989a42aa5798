"""`python -m sparse_viz.analysis <command> ...`: one parser, subcommands from a registry.

A command is a pair `(add_arguments(parser), run(args))` in `COMMANDS`. Modules listed in
`COMMAND_MODULES` are imported when the parser is built and add their own commands with
`register_command`; `mask` (token masking) is registered here. Every command gets the common
options from `add_common_arguments` and turns bad input into `UserInputError` (one line on
stderr, exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import re
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sparse_viz.errors import UserInputError, exit_on_user_error

PROG = "python -m sparse_viz.analysis"

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], object]

COMMANDS: dict[str, tuple[AddArguments, Run]] = {}
COMMAND_HELP: dict[str, str] = {}

# Modules that call `register_command` at import time; imported lazily by `build_parser` so
# that `import sparse_viz.analysis.cli` stays cheap. Add new analyses here.
COMMAND_MODULES: list[str] = [
    "sparse_viz.analysis.ablation_cli",  # heads, components (issue 6)
    "sparse_viz.analysis.vision_cli",  # mask with --image/--mask for Qwen3-VL (issue 5; replaces `mask`)
    "sparse_viz.analysis.batch",  # batch --config prompts.yaml (issue 5)
]


def register_command(name: str, add_arguments: AddArguments, run: Run, help: str = "") -> None:
    """Add (or replace) subcommand `name`."""
    COMMANDS[name] = (add_arguments, run)
    COMMAND_HELP[name] = help


# -- shared options and their parsing ---------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --prompt/--prompt-file, --device, --dtype, --chat, --output, --trust-remote-code.

    --device and --dtype are validated when the model loads (one-line error), not by argparse.
    """
    parser.add_argument("--model", required=True, help="local model directory or hub id (hub only when online)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument(
        "--prompt-file", help="file whose whole content is the prompt (default: ./prompt.txt if present)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    parser.add_argument("--output", default=None, help="output directory (replaced atomically)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")


def resolve_prompt(args: argparse.Namespace) -> str:
    """The prompt text from --prompt, --prompt-file, ./prompt.txt or the built-in default.

    Raises:
        UserInputError: unreadable prompt file or empty prompt.
    """
    from sparse_viz.analysis.prompts import read_prompt

    return read_prompt(getattr(args, "prompt", None), getattr(args, "prompt_file", None))


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


# -- mask ------------------------------------------------------------------------------------


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--num-tokens", type=int, default=1, help="generation steps G >= 1 (step 0 = prompt)")
    parser.add_argument("--layers", default=None, help='layers to analyse, e.g. "0,3,5-9" (default: all)')
    parser.add_argument("--positions", default=None, help='key positions to mask, e.g. "0-4,7" (default: all)')
    parser.add_argument("--exclude-first-token", action="store_true", help="never mask position 0")
    parser.add_argument(
        "--method", default="fast", choices=("fast", "reference"), help="fast (default) or brute-force reference"
    )
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def run_mask(args: argparse.Namespace) -> object:
    # Cheap checks first: bad input is reported before torch and the model load.
    if args.num_tokens < 1:
        raise UserInputError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    output = check_output_dir(args.output or "results/masking")
    prompt = resolve_prompt(args)

    from sparse_viz.analysis.token_masking import run_masking_experiment, write_masking_outputs

    results = run_masking_experiment(
        prompt=prompt,
        model_name=args.model,
        device=args.device,
        dtype=args.dtype,
        num_tokens=args.num_tokens,
        layers=args.layers,
        positions=args.positions,
        exclude_first_token=args.exclude_first_token,
        chat=args.chat,
        method=args.method,
        trust_remote_code=args.trust_remote_code,
        progress=True,
    )
    metadata = results.attrs["metadata"]
    write_masking_outputs(output, results, metadata, report=not args.no_report)
    print(f"generated: {metadata['generated_text']!r}")
    print(f"{len(results)} rows written to {output}")
    return results


register_command("mask", add_mask_arguments, run_mask, help="token masking impact per layer (seed 000)")


# -- entry point -----------------------------------------------------------------------------


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem, and where help is), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = OneLineErrorParser(prog=PROG, description="Probe pretrained checkpoints.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=COMMAND_HELP.get(name, ""))
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse `argv` and run the chosen command; bad input exits 2 with one line."""
    parser = build_parser()

    def run() -> object:
        args = parser.parse_args(argv)
        return COMMANDS[args.command][1](args)

    exit_on_user_error(run, PROG)
