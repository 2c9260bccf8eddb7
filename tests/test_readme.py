"""The README's test command is the one CI runs (DEVELOPERS.md: .ci/run calls exactly it)."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_commands()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, commands
    assert test_commands[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_install_and_run_command_uses_real_flags() -> None:
    run = [c for c in _readme_commands() if "--backend" in c]
    assert run, "README must show how to install and run the proxy"
    assert "--listen" in run[0]
