"""pyproject.toml lists every package by name; this holds the list to the tree.

setuptools installs only the packages named in [tool.setuptools] packages, so a new folder
with an __init__.py (a backend, say) that nobody adds to the list would be missing from every
installed copy while a source checkout works: the tests below would pass here and the package
would break for users. This test derives the packages from the folders and compares.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    found = set()
    for package, folder in _setuptools()["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join((package, *rel.parts)))
    return found


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    listed = set(_setuptools()["packages"])
    on_disk = _packages_on_disk()
    assert on_disk - listed == set(), f"package folders missing from pyproject's packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"pyproject lists packages with no folder: {sorted(listed - on_disk)}"


def test_the_check_sees_the_backends():
    # The derivation above must find nested packages, or the first test could pass vacuously.
    assert {"capsspec", "capsspec.backends.torch", "capsspec.conformance"} <= _packages_on_disk()
