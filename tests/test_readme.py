"""Every command the README prints exists as printed: a renamed command, flag or make target breaks
this suite, not a newcomer. Commands run to their --help (the whole runs are the other tests' job)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
COMMAND = re.compile(r"^(make|\.venv/bin/\S+)\b")


def readme_commands() -> list[str]:
    """Commands in code blocks (indented or fenced) and in `inline code`, as printed."""
    found = []
    in_fence = False
    for line in README.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        text = line.strip()
        if (in_fence or line.startswith("    ")) and COMMAND.match(text):
            found.append(text)
        for inline in re.findall(r"`([^`]+)`", line):
            if COMMAND.match(inline.strip()):
                found.append(inline.strip())
    return sorted(set(found))


def _flags(argv: list[str]) -> list[str]:
    """The --options of a command line; `[--size 512]` (an optional part, as usage lines print it) counts too."""
    tokens = [a.strip("[]").split("|")[0] for a in argv]
    return [t.split("=")[0] for t in tokens if t.startswith("--")]


def test_the_readme_has_the_two_quick_start_commands():
    commands = readme_commands()
    assert "make demo" in commands and "make test" in commands, commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_exists_as_printed(command):
    argv = shlex.split(command.split("  #")[0])
    if argv[0] == "make":
        targets = [a for a in argv[1:] if "=" not in a] or [None]  # bare `make`: the first target
        for target in targets:
            run = subprocess.run(["make", "-n", *([target] if target else [])], cwd=REPO, capture_output=True, text=True)
            assert run.returncode == 0, f"{command}: {run.stderr}"
        return
    exe = argv[0].removeprefix(".venv/bin/")
    if exe == "telepresence":
        sub = argv[1]
        helptext = subprocess.run([sys.executable, "-m", "telepresence.cli", sub, "--help"], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
        rest = argv[2:]
    elif exe == "python":
        if argv[1] == "-m":
            target, rest = [sys.executable, "-m", argv[2]], argv[3:]
        else:
            target, rest = [sys.executable, argv[1]], argv[2:]
        helptext = subprocess.run([*target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    else:
        pytest.fail(f"{command}: the README prints a program this test does not know ({exe})")
    assert helptext.returncode == 0, f"{command}: --help failed: {helptext.stderr[-500:]}"
    for flag in _flags(rest):
        assert flag in helptext.stdout, f"{command}: {flag} is not an option any more"
