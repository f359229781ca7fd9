"""The two fresh-machine commands (scripts/quickstart.sh, scripts/test.sh): wired up, and their flags still valid.

Running them means installing frameworks and training, which CI does by running scripts/test.sh
itself; here they are checked without running: the shell parses them, every capsspec command
they run parses with today's command line, CI calls the test script, and the README leads with both.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from capsspec.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/quickstart.sh", "scripts/test.sh", "scripts/setup.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_as_bash(name):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    subprocess.run([bash, "-n", str(ROOT / name)], check=True)


def test_the_entry_scripts_are_executable():
    for name in ("scripts/quickstart.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(ROOT / name, os.X_OK), name


def test_every_capsspec_command_in_the_quick_start_parses():
    commands = [line.strip() for line in (ROOT / "scripts/quickstart.sh").read_text().splitlines()
                if line.strip().startswith("capsspec ")]
    assert any(c.startswith("capsspec train ") for c in commands) and any(c.startswith("capsspec figures ")
                                                                            for c in commands)
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command.replace('"$out"', "runs/quickstart"))[1:]
        args, extra = parser.parse_known_args(argv)
        assert not extra, (command, extra)


def test_ci_runs_the_test_script_and_the_readme_leads_with_both():
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^[^#\n]*scripts/test\.sh", ci, re.M), ci
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ")[1]
    assert first_section.startswith("Quick start")
    first_block = first_section.split("```")[1]
    assert "scripts/quickstart.sh" in first_block and "scripts/test.sh" in first_block
    makefile = (ROOT / "Makefile").read_text()
    assert "\tscripts/quickstart.sh" in makefile and "\tscripts/test.sh" in makefile
