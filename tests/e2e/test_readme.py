"""The README's first two commands (set up and serve; set up and test) refer to real things.

Running them for real takes minutes (pip builds llama-cpp-python), so this checks each step
instead: the venv module, the package and its ``test`` extra, the ``appliance serve``
command line (parsed by the real CLI parser) and pytest.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def first_two_commands() -> list[str]:
    if not README.is_file():
        pytest.skip("README.md does not exist yet")
    match = re.search(r"```(?:sh|bash|shell)\n(.*?)```", README.read_text(), re.DOTALL)
    if match is None:
        pytest.skip("README.md has no sh block yet")
    lines = [line.strip() for line in match.group(1).splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert len(commands) >= 2, f"the first sh block has fewer than two commands: {commands}"
    return commands[:2]


def steps(command: str) -> list[list[str]]:
    return [shlex.split(part) for part in command.split("&&")]


def check_step(argv: list[str]) -> None:
    program = Path(argv[0]).name
    if program.startswith("python"):
        assert argv[1] == "-m", argv
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "venv":
            assert argv[3:] == [".venv"], argv
        elif module == "appliance":
            _parser().parse_args(argv[3:])
        elif module == "pytest":
            assert (ROOT / "pyproject.toml").is_file()
        return
    if program == "pip":
        assert argv[1] == "install", argv
        target = argv[-1]
        assert "-e" in argv or target.startswith(".")
        spec = target.split("[", 1)
        assert (ROOT / spec[0] / "pyproject.toml").is_file()
        if len(spec) == 2:
            extras = spec[1].rstrip("]").split(",")
            project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            for extra in extras:
                assert extra in project["optional-dependencies"], f"no extra [{extra}]"
        return
    if program == "appliance":
        # The console script pip installs, and a command line its parser accepts.
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert project["scripts"]["appliance"] == "appliance.cli:main"
        assert (Path(sys.executable).parent / "appliance").exists()
        _parser().parse_args(argv[1:])
        return
    raise AssertionError(f"unexpected program in the README's first commands: {argv}")


def test_first_command_sets_up_and_serves() -> None:
    first = first_two_commands()[0]
    parsed = steps(first)
    for argv in parsed:
        check_step(argv)
    assert any((Path(a[0]).name == "appliance" and "serve" in a)
               or (a[:3] == ["python", "-m", "appliance"] and "serve" in a) for a in parsed)


def test_second_command_sets_up_and_runs_the_tests() -> None:
    second = first_two_commands()[1]
    parsed = steps(second)
    for argv in parsed:
        check_step(argv)
    assert any("pytest" in argv for argv in parsed)
    assert any(any("[test]" in a for a in argv) for argv in parsed)
