"""The pytest plugin of the conformance suite: choosing the backend, profiles, known gaps, the summary.

Load it with `-p capsspec.conformance.plugin` (the `capsspec conformance` command does), or let
conformance/conftest.py load it when running `python -m pytest conformance` from a checkout.

* --backend NAME or module:attr (or $CAPSSPEC_BACKEND) chooses the backend under test; --device
  passes a device to it. A missing, unknown or unavailable backend stops the run before any
  test, with the reason (exit status 4, pytest's usage error). There is no default: the suite
  never silently tests the reference against itself.
* --conformance-profile ci|full|meta (or $CAPSSPEC_CONFORMANCE_PROFILE; default ci).
* --interchange-with NAMES: the backends to exchange checkpoints with (default: every known one).
* --known-gaps FILE (default: known_gaps/<backend name>.txt next to this module): lines
  "test_id  # reason", where test_id is "module.py::test_name[params]" ('*' and '?' are
  wildcards; brackets are literal). Each gap is applied as a strict xfail, so a gap that starts passing fails the run
  and is listed as stale; a gap that matches no test is listed too.
* An inference-only backend (Backend.trains False) is held to spec.INFERENCE_NAMES only: every
  check marked `uses(...)` with a name outside Backend.required_names() is reported as a skip
  whose reason starts with "not applicable:", never as passed, and the summary counts them.
* For a backend that compiles per shape (Backend.compiles_per_shape), the ci profile draws sizes
  from small pools (profiles.py), and the backend's compiled programs are released
  (Backend.clear_compiled) after any test that leaves the process holding more than half the
  memory maps Linux allows it (vm.max_map_count, 65530 by default): the CPU code of each
  program JAX keeps holds dozens of maps, and at the limit XLA's compiler crashes the process.
* At the end, a summary per check: examples run, comparisons made, the largest error as a
  fraction of its tolerance, and the largest absolute error.
* The fixture `capsspec_check` holds a piece of the user's own CapsNet to the reference in one line
  of their own test (own.check_op; docs/check-your-own.md):
      def test_my_squash(capsspec_check):
          capsspec_check("squash", my_squash, layout="batch caps dim")
  It fails the test with the report when the piece does not conform. A session that only uses the
  fixture needs no --backend; the suite's own checks still refuse to run without one.
* The fixture `capsspec_check_model` does the same for a whole model (user_model.check_model):
      def test_my_capsnet(capsspec_check_model):
          capsspec_check_model(MyCapsNet(), "mapping.toml", loss=my_loss)

What this module must never do: pick a backend on its own, or turn a failure into a skip.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import compare, profiles
from .selection import ENV_VAR, Selected, SelectionError, backend_from_environment, resolve_backend

KNOWN_GAPS_DIR = Path(__file__).resolve().parent / "known_gaps"

_STATE = pytest.StashKey["_State"]()
_NO_BACKEND = pytest.StashKey[bool]()
_NO_BACKEND_MESSAGE = (f"capsspec conformance: no backend chosen. Pass --backend NAME (or 'module:attr'), or set "
                       f"${ENV_VAR}. The suite has no default backend.")


@dataclass
class _State:
    selected: Selected
    profile: str
    partners: list[str]
    gaps_file: Path | None
    gaps: list[tuple[str, str]] = field(default_factory=list)
    used_gaps: set[str] = field(default_factory=set)
    gap_items: dict[str, str] = field(default_factory=dict)  # nodeid -> pattern
    stale: list[str] = field(default_factory=list)
    not_applicable: int = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("capsspec-conformance", "capsspec conformance suite")
    group.addoption("--backend", action="store", default=None, metavar="NAME",
                    help=f"backend under test: a registered name or 'module:attr' (default: ${ENV_VAR})")
    group.addoption("--device", action="store", default=None, help="device passed to the backend under test")
    group.addoption("--conformance-profile", action="store", default=None, choices=sorted(profiles.PROFILES),
                    help=f"example budget: ci (default), full or meta (or ${profiles.ENV_VAR})")
    group.addoption("--interchange-with", action="store", default=None, metavar="NAMES",
                    help="comma-separated backends to exchange checkpoints with (default: every known backend)")
    group.addoption("--known-gaps", action="store", default=None, metavar="FILE",
                    help="file of known gaps (default: known_gaps/<backend name>.txt in the suite)")


def _gap_regex(pattern: str) -> re.Pattern:
    """'*' and '?' are wildcards; everything else (the brackets of parametrized ids too) is literal."""
    return re.compile("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern) + r"\Z")


def _parse_gaps(path: Path) -> list[tuple[str, str]]:
    gaps = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test_id, _, reason = line.partition("#")
        test_id, reason = test_id.strip(), reason.strip()
        if not reason:
            raise pytest.UsageError(f"{path}:{lineno}: a known gap needs a reason after '#': {line!r}")
        gaps.append((test_id, reason))
    return gaps


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or getattr(config.option, "version", False):
        return
    config.addinivalue_line("markers", "conformance: a check of the capsspec conformance suite")
    config.addinivalue_line("markers", "uses(*names): the spec names a check calls (for inference-only backends)")
    spec = config.getoption("--backend") or backend_from_environment()
    if not spec:  # fine for the capsspec_check fixture alone; the suite's checks stop at collection
        config.stash[_NO_BACKEND] = True
        return
    try:
        selected = resolve_backend(spec, config.getoption("--device"))
    except SelectionError as exc:
        pytest.exit(f"capsspec conformance: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    profile = config.getoption("--conformance-profile") or os.environ.get(profiles.ENV_VAR) or "ci"
    if profile not in profiles.PROFILES:
        pytest.exit(f"capsspec conformance: profile must be one of {sorted(profiles.PROFILES)}, got {profile!r}",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    profiles.activate(profile)
    from . import strategies

    strategies.pool_shapes(profiles.pools_shapes(profile, selected.backend))
    from capsspec.registry import backend_names

    partners_opt = config.getoption("--interchange-with")
    partners = [p.strip() for p in partners_opt.split(",") if p.strip()] if partners_opt else backend_names()
    gaps_opt = config.getoption("--known-gaps")
    gaps_file = Path(gaps_opt) if gaps_opt else KNOWN_GAPS_DIR / f"{selected.name}.txt"
    if gaps_opt and not gaps_file.is_file():
        pytest.exit(f"capsspec conformance: --known-gaps {gaps_opt!r} is not a file",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    state = _State(selected, profile, partners, gaps_file if gaps_file.is_file() else None)
    if state.gaps_file is not None:
        state.gaps = _parse_gaps(state.gaps_file)
    config.stash[_STATE] = state
    compare.reset_stats()


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _STATE not in config.stash:
        return []
    st = _state(config)
    b = st.selected.backend
    a = b.availability()
    gaps = f"{st.gaps_file} ({len(st.gaps)} gap(s))" if st.gaps_file else "none"
    return [f"capsspec conformance: backend {st.selected.spec!r} (name {b.name!r}, {b.framework or 'numpy'} "
            f"{a.version}, device {a.device}), dtypes {', '.join(b.dtypes)}, profile {st.profile}"
            + (" (sizes from the shape pools: the backend compiles per shape)" if profiles.pools_shapes(st.profile, b)
               else ""),
            f"capsspec conformance: known gaps: {gaps}"]


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Selected:
    """The backend under test (selection.Selected: .backend, .spec, .device)."""
    return _state(request.config).selected


@pytest.fixture
def capsspec_check(request: pytest.FixtureRequest) -> Any:
    """check(piece, fn, **check_op's keywords) -> Report: fails the test (with the report) on a mismatch.
    The profile is --conformance-profile's (or $CAPSSPEC_CONFORMANCE_PROFILE's), ci by default."""
    from .own import assert_conforms

    profile = request.config.getoption("--conformance-profile") or os.environ.get(profiles.ENV_VAR) or "ci"

    def check(piece: str, fn: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("profile", profile)
        return assert_conforms(piece, fn, **kwargs)

    return check


@pytest.fixture
def capsspec_check_model() -> Any:
    """check(model, mapping, **check_model's keywords) -> ModelReport: fails the test (with the report) when
    the user's whole model does not conform (user_model.check_model; docs/import-your-model.md)."""
    from .user_model import check_model

    def check(model: Any, mapping: Any, **kwargs: Any) -> Any:
        report = check_model(model, mapping, **kwargs)
        report.raise_for_failure()
        return report

    return check


def _ours(module: Any) -> bool:
    """Whether a test module is one of the suite's (other tests in the same session are left alone)."""
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent == Path(__file__).resolve().parent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if _STATE not in metafunc.config.stash or not _ours(metafunc.module):
        return
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", ["float32", "float64"])
    if "partner" in metafunc.fixturenames:
        metafunc.parametrize("partner", _state(metafunc.config).partners)


def _short_id(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    mod = (module.__name__.rsplit(".", 1)[-1] + ".py") if module is not None else item.nodeid.split("::")[0]
    return f"{mod}::{item.name}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash.get(_NO_BACKEND, False) and any(_ours(getattr(item, "module", None)) for item in items):
        pytest.exit(_NO_BACKEND_MESSAGE, returncode=pytest.ExitCode.USAGE_ERROR)
    if _STATE not in config.stash:
        return
    st = _state(config)
    b = st.selected.backend
    for item in items:
        if not _ours(getattr(item, "module", None)):
            continue
        callspec = getattr(item, "callspec", None)
        dtype = callspec.params.get("dtype") if callspec is not None else None
        if dtype is not None and dtype not in b.dtypes:
            item.add_marker(pytest.mark.skip(
                reason=f"backend {st.selected.spec!r} does not support {dtype} (its dtypes: {', '.join(b.dtypes)})"))
        uses = {n for m in item.iter_markers("uses") for n in m.args}
        outside = sorted(uses - set(b.required_names()))
        if outside:
            st.not_applicable += 1
            item.add_marker(pytest.mark.skip(
                reason=f"not applicable: backend {st.selected.spec!r} is inference-only (trains is False) and "
                       f"this check uses {', '.join(outside)}"))
            continue
        short = _short_id(item)
        for pattern, reason in st.gaps:
            if _gap_regex(pattern).match(short):
                st.used_gaps.add(pattern)
                st.gap_items[item.nodeid] = pattern
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"known gap ({st.gaps_file.name}): {reason}"))
                break


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    compare.set_current_check(_short_id(item))
    try:
        return (yield)
    finally:
        compare.set_current_check(None)


def _memory_maps() -> tuple[int, int]:
    """(memory maps this process holds, the most it may hold); (0, 0) where Linux's /proc is not."""
    try:
        with open("/proc/self/maps", "rb") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except (OSError, ValueError):
        return 0, 0


def release_compiled_if_short(backend: Any) -> bool:
    """Release a compiling backend's programs when the process holds more than half the memory maps
    it may (see the module docstring); True if it did."""
    if not getattr(backend, "compiles_per_shape", False):
        return False
    held, limit = _memory_maps()
    if held <= limit // 2:
        return False
    backend.clear_compiled()
    return True


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _STATE in item.config.stash:
        release_compiled_if_short(_state(item.config).selected.backend)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A strict xfail that passes is reported as failed with "[XPASS(strict)]": a stale gap.
    if report.when == "call" and report.failed and "XPASS(strict)" in str(report.longrepr):
        _STALE.append(report.nodeid)


_STALE: list[str] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _STATE not in config.stash:
        return
    st = _state(config)
    tr = terminalreporter
    tr.section(f"capsspec conformance: backend {st.selected.spec!r}, profile {st.profile}")
    rows = sorted(compare.STATS.items())
    if rows:
        width = max(len(k) for k, _ in rows)
        tr.write_line(f"{'check':<{width}}  examples  compared  max err/tol  max abs err  worst")
        for name, s in rows:
            tr.write_line(f"{name:<{width}}  {s.examples:>8}  {s.comparisons:>8}  {s.max_ratio:>11.3g}  "
                          f"{s.max_abs:>11.3g}  {s.worst}")
    else:
        tr.write_line("no comparisons were made")
    if st.not_applicable:
        tr.write_line(f"not applicable: {st.not_applicable} check(s) of training names: backend {st.selected.spec!r} "
                      f"is inference-only and implements {', '.join(st.selected.backend.required_names())} only "
                      f"(these checks were skipped, not passed)", yellow=True)
    unused = [p for p, _ in st.gaps if p not in st.used_gaps]
    stale = [n for n in _STALE if n in st.gap_items]
    if unused:
        tr.write_line(f"known gaps matching no test (stale, remove them from {st.gaps_file}):", yellow=True)
        for p in unused:
            tr.write_line(f"  {p}", yellow=True)
    if stale:
        tr.write_line(f"known gaps that now pass (stale, remove them from {st.gaps_file}):", red=True)
        for n in stale:
            tr.write_line(f"  {st.gap_items[n]}  ({n})", red=True)
    _STALE.clear()
