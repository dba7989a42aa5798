"""Every command line in README.md's ```bash blocks runs, so the README cannot drift from the code.

Each line is taken from the README as written (backslash continuations joined, comments
dropped) and run as `python -m <module>` runs it (`runpy.run_module(..., run_name="__main__")`
with that argv: the same entry point, without paying seconds of imports per line), in a
scratch directory laid out like the repository (`configs/`, `.cache/smollm2-135m`), so every
relative path in the README resolves as it does for a user and every output lands in the
scratch `results/`. Only what the README itself leaves open is filled in (PLACEHOLDERS), and
only the lines that would train for minutes get options appended (SHORTER), each said below.

Lines that are not `python -m sparse_viz.*` commands are listed in NOT_RUN with the test that
covers them instead; a new kind of line fails `test_every_readme_line_is_run_or_accounted_for`.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest
from test_vision_tiny_model import save_tiny_vl, tiny_qwen3_vl

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROMPT = "The capital of France is"
# Not run here: the set-up script (tests/test_install_constraints.py runs it with recording
# shims; running it for real installs packages) and the test suite itself (this is in it).
NOT_RUN = {"scripts/setup.sh", "scripts/setup.sh --dev", "python -m pytest"}
# Options appended to shorten a line: (module, first word of its arguments or None) -> options.
SHORTER = {
    # Training runs stop after 2 optimizer steps (the README's runs take minutes to hours);
    # the resume line then continues to 4.
    ("sparse_viz.train", None): ["--trainer.max_steps=2"],
    # 1 window of 160 tokens instead of 4 x 1024 (k up to 128 still fits in a window).
    ("sparse_viz.analysis", "sparse-eval"): ["--seq-len", "160", "--windows", "1"],
}


def readme_lines() -> list[str]:
    """The README's shell command lines, in order: ```bash blocks, continuations joined,
    comment lines and trailing comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def split_commands(line: str) -> list[list[str]]:
    """`a && b` -> [[a...], [b...]]."""
    commands, current = [], []
    for word in shlex.split(line):
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]


def python_commands() -> list[list[str]]:
    """Every `python -m sparse_viz.*` command of the README (argv from the module name on)."""
    found = []
    for line in readme_lines():
        for words in split_commands(line):
            if words[:2] == ["python", "-m"] and words[2].startswith("sparse_viz"):
                found.append(words[2:])
    return found


def test_every_readme_line_is_run_or_accounted_for():
    lines = readme_lines()
    assert len(lines) >= 20  # the parse found the blocks
    for line in lines:
        for words in split_commands(line):
            command = shlex.join(words)
            assert command in NOT_RUN or (words[:2] == ["python", "-m"] and words[2].startswith("sparse_viz.")), (
                f"README line {line!r} is neither a sparse_viz command this test runs nor listed in NOT_RUN")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_dir) -> Path:
    """A scratch directory laid out like the repository, plus what the README leaves to the
    user: a folder of texts, a Qwen3-VL checkpoint (the tiny one the tests build: none ships)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(ROOT / "configs")
    (root / ".cache").mkdir()
    (root / ".cache" / "smollm2-135m").symlink_to(smollm2_dir.resolve())
    texts = root / "path" / "to" / "texts"
    texts.mkdir(parents=True)
    # Enough distinct text for a 2048-word BPE and a validation split of 256-token sequences.
    import random

    rng = random.Random(0)
    words = [f"w{i}" + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for i in range(3000)]
    for index in range(3):
        (texts / f"part{index}.txt").write_text(
            "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)))
    model, tokenizer, processor = tiny_qwen3_vl(n_layers=2)
    save_tiny_vl(model, tokenizer, processor, root / "qwen3-vl")
    return root


def substitute(argv: list[str], workspace: Path, runs: list[str]) -> list[str]:
    """Fill the README's placeholders: <run> (a run the README's own training lines made: for
    resuming, the first one, the embedded default; for anything else that reads a run, the
    latest, i.e. the run of the training line just before it), DIR (any checkpoint: the SmolLM2
    it converts), QWEN3_VL_DIR (the tiny Qwen3-VL), "..." (your prompt)."""
    run_dir = None
    if runs:
        run_dir = runs[0] if "--ckpt_path" in argv else runs[-1]
    out = []
    for word in argv:
        if "<run>" in word:
            assert run_dir is not None, "a README line uses results/<run> before any training line ran"
            word = word.replace("results/<run>", run_dir)
        word = {"DIR": ".cache/smollm2-135m", "QWEN3_VL_DIR": str(workspace / "qwen3-vl"), "...": PROMPT}.get(word, word)
        out.append(word)
    return out


def run_module(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m argv[0] argv[1:]` in-process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:]])
    capsys.readouterr()
    status = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules"
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exit_info:
            status = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def expand(argv: list[str]) -> list[list[str]]:
    """`<command> --help` stands for every command's help."""
    if "<command>" not in argv:
        return [argv]
    from sparse_viz.analysis.cli import COMMANDS

    return [[name if word == "<command>" else word for word in argv] for name in COMMANDS]


@pytest.mark.smollm2
@pytest.mark.slow
def test_every_readme_command_runs(workspace, monkeypatch, capsys):
    """Each README command exits 0 and writes what the README says it writes (a run directory
    with report.html; an output folder with report.html and metadata.json)."""
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = []  # run directories announced by the README's training lines, in order
    ran, failures = [], []
    for readme_argv in python_commands():
        module, args = readme_argv[0], readme_argv[1:]
        for argv in expand([module, *substitute(args, workspace, runs)]):
            extra = SHORTER.get((module, None), []) + SHORTER.get((module, argv[1] if len(argv) > 1 else None), [])
            if "--help" in argv:
                extra = []
            if "--ckpt_path" in argv:
                extra = ["--trainer.max_steps=4"]  # continue the 2-step run by 2 more
            status, out, err = run_module(argv + extra, monkeypatch, capsys)
            line = shlex.join(["python", "-m", *argv, *extra])
            ran.append(line)
            # Every line is tried and every failure reported together: one drifted line does
            # not hide the next.
            if status != 0:
                failures.append(f"exit {status}: {line}\n    {err.strip()[-1500:]}")
            elif "--help" in argv:
                if "usage" not in out.lower():
                    failures.append(f"no usage printed: {line}")
            elif module == "sparse_viz.train":
                announced = re.findall(r"run directory: (\S+)", out + err)
                if not announced or not (workspace / announced[-1] / "report.html").is_file():
                    failures.append(f"no run directory with report.html announced: {line}")
                else:
                    runs.append(announced[-1])
            elif "--output" in argv:
                output = workspace / argv[argv.index("--output") + 1]
                missing = [name for name in ("report.html", "metadata.json") if not (output / name).is_file()]
                if missing:
                    failures.append(f"{', '.join(missing)} missing in {output.name}: {line}")
    assert len(ran) >= 25, ran
    assert not failures, "README commands that do not work as written:\n  " + "\n  ".join(failures)
