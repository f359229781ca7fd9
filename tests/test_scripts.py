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

from capsspec.tools.cli import build_parser

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
    text = (ROOT / "scripts/quickstart.sh").read_text().replace("\\\n", " ")  # join continued lines
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("capsspec ")]
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


@pytest.mark.parametrize("failing", ["pytest", "docs", "conformance"])
def test_the_test_script_fails_when_the_tests_fail(tmp_path, failing):
    """scripts/test.sh against a stand-in environment whose pytest run, docs build or conformance run
    fails: the script's exit status must say so (CI reads nothing else)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    fail_pytest = "1" if failing == "pytest" else "0"
    fail_docs = "1" if failing == "docs" else "0"
    fail_conf = "1" if failing == "conformance" else "0"
    stubs = {
        # pip and the version check succeed; pytest and mkdocs exit with the chosen status.
        "python": f'case "$*" in *"-m pytest"*) exit {fail_pytest};; *"-m mkdocs build --strict"*) exit {fail_docs};; '
                  f'*) exit 0;; esac\n',
        "capsspec": f'case "$1" in conformance) exit {fail_conf};; *) exit 0;; esac\n',
    }
    for name, body in stubs.items():
        path = venv / "bin" / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    env = {**os.environ, "CAPSSPEC_VENV": str(venv), "PYTHON": str(venv / "bin" / "python")}
    r = subprocess.run([bash, str(ROOT / "scripts/test.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, f"the {failing} run failed but scripts/test.sh exited 0:\n{r.stdout}\n{r.stderr}"
