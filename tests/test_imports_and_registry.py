"""Import hygiene, the backend registry, and packaging."""

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import capsspec
from capsspec.validation import unchecked
from capsspec import Backend, BackendUnavailable, get_backend
from capsspec.registry import BUILTIN_BACKENDS

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "cupy", "jax", "keras")


def test_importing_capsspec_imports_no_framework():
    code = (
        "import sys, capsspec, capsspec.tools.cli, capsspec.registry;"
        "b = capsspec.get_backend('numpy'); b.squash;"
        "[capsspec.get_backend(n, check=False) for n in capsspec.backend_names()];"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_numpy_backend_is_available_and_complete():
    assert "numpy" in capsspec.available_backends()
    b = get_backend("numpy")
    assert b.missing_names() == []
    # The backend serves the reference's own math, behind the same door as capsspec.ops.
    assert unchecked(b.squash) is unchecked(capsspec.ops.squash)
    assert b.squash is not unchecked(b.squash)


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match="unknown backend 'nope'; known backends: .*numpy"):
        get_backend("nope")


def test_unavailable_backend_says_what_to_install(monkeypatch):
    class Missing(Backend):
        name = "missing"
        framework = "surely_not_an_installed_module_xyz"
        install_hint = "pip install 'capsspec[missing]'"

    monkeypatch.setitem(BUILTIN_BACKENDS, "missing", f"{__name__}:Missing")
    monkeypatch.setitem(globals(), "Missing", Missing)
    b = get_backend("missing", check=False)
    a = b.availability()
    assert not a.available and "pip install 'capsspec[missing]'" in a.reason
    with pytest.raises(BackendUnavailable, match="surely_not_an_installed_module_xyz"):
        get_backend("missing")
    assert "missing" not in capsspec.available_backends()


def test_entry_point_backend_is_found(monkeypatch):
    # A third-party backend joins through the entry-point group; simulate the installed metadata.
    from capsspec import registry

    monkeypatch.setattr(registry, "_entry_points", lambda: {"loopback": "capsspec.backends.numpy:NumpyBackend"})
    assert "loopback" in capsspec.backend_names()
    b = get_backend("loopback")
    np.testing.assert_array_equal(b.squash(np.array([3.0, 4.0])), capsspec.ops.squash(np.array([3.0, 4.0])))


def test_installed_entry_points_cover_builtins():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["capsspec.backends"]
    assert eps == BUILTIN_BACKENDS


def test_every_package_folder_is_listed_and_named_capsspec():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = data["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert all(p == "capsspec" or p.startswith("capsspec.") for p in listed)
    found = set()
    for pkg, folder in tool["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" not in rel:
                found.add(".".join((pkg, *rel)))
    assert found == listed, f"unlisted: {sorted(found - listed)}, stale: {sorted(listed - found)}"
