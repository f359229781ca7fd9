"""What the conformance suite does for a backend that compiles per shape (conformance/strategies.py,
profiles.py, plugin.py, cli.py): only its ci profile draws sizes from the pools, every other part
of a recipe is still drawn, the pools cover each range's corners, its compiled programs are
released when the process runs short of memory maps, and its ci environment is added. Seconds."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from capsspec.config import CapsNetConfig  # noqa: E402
from capsspec.conformance import plugin, profiles  # noqa: E402
from capsspec.conformance import strategies as S  # noqa: E402
from capsspec.conformance.records import RECORDS  # noqa: E402

# What a recipe draws besides its sizes (values, seeds, cotangents, margins, labels).
NOT_SIZES = {"seed", "kind", "scale", "row_scales", "cot", "m_plus", "m_minus", "lambda_", "labels", "loss_scale"}


def _draw(strategy, n=30):
    out = []

    @settings(derandomize=True, database=None, max_examples=n, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(r):
        out.append(r)

    collect()
    return out


@pytest.fixture
def pooled():
    S.pool_shapes(True)
    yield
    S.pool_shapes(False)


class _Compiling:
    compiles_per_shape = True
    cleared = 0

    def clear_compiled(self):
        self.cleared += 1


def test_only_the_ci_profile_of_a_compiling_backend_pools_sizes():
    assert profiles.pools_shapes("ci", _Compiling())
    assert not profiles.pools_shapes("full", _Compiling()) and not profiles.pools_shapes("meta", _Compiling())
    from capsspec import get_backend

    assert not profiles.pools_shapes("ci", get_backend("numpy"))


@pytest.mark.parametrize("name", list(RECORDS))
def test_pooled_op_recipes_take_their_sizes_from_the_pool_and_draw_the_rest(pooled, name):
    recipes = _draw(RECORDS[name].recipes("float32"))
    sizes = {repr({k: v for k, v in r.items() if k not in NOT_SIZES}) for r in recipes}
    assert 2 <= len(sizes) <= S.POOL_SIZE, sizes
    assert len({r["seed"] for r in recipes}) > 10  # values are still drawn afresh


def test_unpooled_recipes_draw_sizes_freely():
    S.pool_shapes(False)
    recipes = _draw(RECORDS["routing"].recipes("float32"))
    assert len({(r["B"], r["N"], r["J"], r["E"], r["iterations"]) for r in recipes}) > S.POOL_SIZE


def test_pooled_model_recipes_use_the_config_pool_with_its_batch_sizes(pooled):
    recipes = _draw(S.model_recipes(min_batch=2), 20) + _draw(S.trajectory_recipes(), 10)
    assert {repr(r["config"]) for r in recipes} <= {repr(c) for c in S.CONFIG_POOL}
    for r in recipes:
        i = S.CONFIG_POOL.index(r["config"])
        for x in r.get("batches", [r.get("x")]):
            assert x["B"] == max(2 if "x" in r else 1, S.BATCH_POOL[i])
    assert {r["config"]["routing_iterations"] for r in recipes} >= {1, 3}  # not the default alone


def test_pools_hold_each_ranges_corners_and_valid_shapes():
    pool = S.sizes(N=(1, 12), J=(2, 6)).pool
    assert {"N": 1, "J": 2} in pool and {"N": 12, "J": 6} in pool and {"N": 6, "J": 4} in pool
    for square, stride in ((False, 3), (True, 2)):
        for g in S.conv_geometry(square, stride).pool:
            assert 1 <= g["kh"] <= g["H"] <= g["kh"] + 6 and 1 <= g["kw"] <= g["W"] <= g["kw"] + 6
            assert 1 <= g["stride"] <= stride and (g["kh"] == g["kw"] or not square)
    for c in S.CONFIG_POOL:
        CapsNetConfig(**c)  # valid (raises otherwise)
    assert {c["use_decoder"] for c in S.CONFIG_POOL} == {True, False}


def test_a_compiling_backend_is_released_only_when_memory_maps_run_short(monkeypatch):
    b = _Compiling()
    monkeypatch.setattr(plugin, "_memory_maps", lambda: (1000, 65530))
    assert not plugin.release_compiled_if_short(b) and b.cleared == 0
    monkeypatch.setattr(plugin, "_memory_maps", lambda: (40000, 65530))
    assert plugin.release_compiled_if_short(b) and b.cleared == 1
    from capsspec import get_backend

    assert not plugin.release_compiled_if_short(get_backend("numpy"))  # compiles nothing: never asked


def test_memory_maps_are_read_on_linux():
    held, limit = plugin._memory_maps()
    if limit == 0:
        pytest.skip("no /proc here")
    assert 0 < held < limit


def test_ci_environment_is_added_for_the_ci_profile_only(monkeypatch):
    from capsspec.conformance.cli import environment

    class WithFlags:
        ci_environment = {"XLA_FLAGS": "--cheap"}

    monkeypatch.setenv("XLA_FLAGS", "--mine")
    assert environment(WithFlags(), "ci")["XLA_FLAGS"] == "--mine --cheap"  # the user's flags are kept
    monkeypatch.delenv("XLA_FLAGS")
    assert environment(WithFlags(), "ci")["XLA_FLAGS"] == "--cheap"
    assert environment(WithFlags(), "full") is None and environment(_Compiling(), "ci") is None
