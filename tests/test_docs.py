"""The README's and the docs' examples: the code blocks marked runnable run, and examples use the public API.

A block is marked by a line `<!-- runnable -->` right before its opening fence (invisible on GitHub
and in the MkDocs site). Python blocks run in a fresh interpreter with PYTHONPATH set to this
checkout; bash blocks run under `bash -euo pipefail` with a `capsspec` command on PATH that is
this checkout's (nothing needs to be installed). Each runs in an empty temporary folder. Only
fast blocks are marked: no downloads, no training longer than a few seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
LANGUAGES = ("python", "bash")

# The runnable blocks each page had when this test was written, at least: a marker that stops
# being recognised (or a block dropped by mistake) fails here instead of silently running nothing.
EXPECTED_AT_LEAST = {
    "README.md": {"python": 1},
    "docs/spec.md": {"python": 1},
    "docs/backends.md": {"python": 1, "bash": 1},
    "docs/conformance.md": {"bash": 1},
    "docs/training.md": {"bash": 1},
    "docs/gpu-check.md": {"bash": 1},
    "docs/performance.md": {"bash": 1},
    "docs/import-your-model.md": {"python": 1},
    "docs/check-your-own.md": {"python": 1, "bash": 1},
}

# Examples show `import capsspec` and the names of capsspec.__all__ (capsspec.get_backend(...) and
# the backend's own methods). Two modules more: the kit, for backend authors, whom docs/backends.md
# shows how to build on it; and the conformance package, whose check_op and check_model
# docs/check-your-own.md and docs/import-your-model.md show to anyone holding their own CapsNet to
# the reference (capsspec.conformance is not imported by `import capsspec`).
AUTHOR_MODULES = ("capsspec.backend_kit", "capsspec.conformance")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    runnable: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def extract_blocks(text: str, path: str = "<text>") -> list[Block]:
    """Every fenced code block of a Markdown text, marked runnable or not.

    A marker that is not followed by a python or bash fence is an error (ValueError), so a marker
    cannot silently mark nothing."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped == MARKER:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not (nxt.startswith("```") and nxt[3:].strip() in LANGUAGES):
                raise ValueError(f"{path}:{i + 1}: {MARKER} must come right before a ```python or ```bash fence")
        if stripped.startswith("```") and len(stripped) > 3:
            fence_indent = len(lines[i]) - len(lines[i].lstrip())
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{path}:{i + 1}: a code block that is never closed")
            code = "\n".join(line[fence_indent:] for line in lines[i + 1:end]) + "\n"
            runnable = i > 0 and lines[i - 1].strip() == MARKER
            blocks.append(Block(path, i + 1, stripped[3:].strip(), code, runnable))
            i = end
        i += 1
    return blocks


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for p in markdown_files() for b in extract_blocks(p.read_text(), str(p.relative_to(ROOT)))]


RUNNABLE = [b for b in all_blocks() if b.runnable]


def _environment(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MPLBACKEND"] = "Agg"
    return env


def run_block(block: Block, workdir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one block in `workdir` as a reader would, with this checkout's capsspec."""
    bin_dir = workdir / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "capsspec"  # the command an install would put on PATH
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m capsspec "$@"\n')
    shim.chmod(0o755)
    if block.language == "python":
        script = workdir / "block.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    elif block.language == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        raise ValueError(f"{block}: cannot run a {block.language!r} block")
    return subprocess.run(argv, cwd=workdir, env=_environment(bin_dir), capture_output=True, text=True,
                          timeout=timeout)


def check_block(block: Block, workdir: Path) -> None:
    """Fail (AssertionError, with the block's output) when the block does not run to exit status 0."""
    r = run_block(block, workdir)
    assert r.returncode == 0, (f"{block} ({block.language}) exited with {r.returncode}:\n{block.code}\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_runnable_block_runs(block, tmp_path):
    check_block(block, tmp_path)


def test_the_expected_runnable_blocks_are_found():
    found: dict[str, dict[str, int]] = {}
    for b in RUNNABLE:
        found.setdefault(b.path, {}).setdefault(b.language, 0)
        found[b.path][b.language] += 1
    for path, counts in EXPECTED_AT_LEAST.items():
        for language, n in counts.items():
            assert found.get(path, {}).get(language, 0) >= n, (path, language, found.get(path))
    readme_python = [b for b in RUNNABLE if b.path == "README.md" and b.language == "python"]
    assert any("capsspec.get_backend(" in b.code for b in readme_python), "the README's example must be runnable"


def test_a_failing_block_fails_the_test(tmp_path):
    """The runner must not pass a broken snippet: a python block that raises, a bash block whose
    command fails (also in the middle of a block), and an unknown capsspec command."""
    text = "\n".join([
        MARKER, "```python", "import capsspec", "raise SystemExit(capsspec.nonexistent_name)", "```", "",
        MARKER, "```bash", "false", "echo not reached", "```", "",
        MARKER, "```bash", "capsspec no-such-command", "```", "",
        "```python", "raise RuntimeError('not marked, never run')", "```",
    ])
    blocks = extract_blocks(text)
    assert [b.runnable for b in blocks] == [True, True, True, False]
    for block in blocks[:3]:
        with pytest.raises(AssertionError, match="exited with"):
            check_block(block, tmp_path)
    check_block(extract_blocks(f"{MARKER}\n```bash\ncapsspec --help >/dev/null\n```\n")[0], tmp_path)


def test_a_marker_without_a_block_is_refused():
    with pytest.raises(ValueError, match="right before"):
        extract_blocks(f"{MARKER}\n\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="right before"):
        extract_blocks(f"{MARKER}\n```text\nhello\n```\n")


def _public_names() -> set[str]:
    import capsspec

    return set(capsspec.__all__)


def test_examples_use_only_the_public_api():
    """Every python block of the README and the docs, marked or not: `import capsspec`, names of
    capsspec.__all__, and nothing from capsspec's inner modules (capsspec.training, capsspec.tools, ...)."""
    public = _public_names()
    problems = []
    for b in (b for b in all_blocks() if b.language == "python"):
        for m in re.finditer(r"^\s*(?:from|import)\s+(capsspec(?:\.\w+)*)", b.code, re.M):
            if m.group(1) != "capsspec" and m.group(1) not in AUTHOR_MODULES:
                problems.append(f"{b}: imports {m.group(1)}")
        for m in re.finditer(r"\bcapsspec\.(\w+)", b.code):
            if m.group(1) not in public and f"capsspec.{m.group(1)}" not in AUTHOR_MODULES:
                problems.append(f"{b}: uses capsspec.{m.group(1)}, which is not in capsspec.__all__")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
