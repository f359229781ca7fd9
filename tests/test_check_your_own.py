"""Check your own CapsNet (capsspec.conformance.check_op): user-style pieces in PyTorch, Keras and JAX.

tests/user_capsnets/ holds, per framework, a correct version and deviating versions of the pieces,
each framework in layouts of its own. Every correct version must pass, every deviation must fail
and (where a known deviation fits) be named by its key. Correct versions run on the ci profile;
deviations on the meta profile (6 draws, no shrinking: naming on the first failing draw; a case whose
mistake shows on some draws only asks for more draws, or for the ci profile), and
one of them on ci, to show the shrunk counterexample and the reproduction line. Then the layout
errors, the command line and the pytest fixture.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from capsspec.conformance import check_op
from capsspec.conformance import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # tests/user_capsnets, imported like a user's package

MODULES = {"torch": "user_capsnets.torch_capsnet", "tensorflow": "user_capsnets.keras_capsnet",
           "jax": "user_capsnets.jax_capsnet"}


def _cases():
    out = []
    for framework, module in MODULES.items():
        try:
            importlib.import_module(framework)
        except ImportError:
            continue
        for name, op, fn, kwargs, expected in importlib.import_module(module).CASES:
            out.append(pytest.param(framework, op, fn, kwargs, expected, id=f"{framework}-{name}"))
    return out


CASES = _cases()


@pytest.mark.parametrize("framework, op, fn, kwargs, expected", CASES)
def test_each_user_piece_passes_or_is_caught_and_named(framework, op, fn, kwargs, expected):
    kwargs = {"profile": "ci" if expected is None else "meta", "max_examples": 8 if expected is None else None,
              **kwargs}
    report = check_op(op, fn, **kwargs)
    assert report.framework == framework  # inferred from the defining module
    if expected is None:
        assert report.passed, str(report)
        assert sum(report.draws.values()) == 8
        return
    assert not report.passed, f"{framework} {op}: a deviating version passed:\n{report}"
    if expected == "caught":
        assert report.deviation is None, str(report)
    else:
        assert report.deviation == expected, str(report)
        assert "The paper's rule:" in str(report) and "docs/spec.md#" in str(report)


def test_the_suite_has_ten_deviations_and_correct_versions_in_three_frameworks():
    ids = [p.id for p in CASES]
    named = {p.values[4] for p in CASES if p.values[4] not in (None, "caught")}
    assert len(named) >= 10, sorted(named)
    assert {i.split("-")[0] for i in ids} >= {"torch", "tensorflow", "jax"}


def test_a_failure_is_shrunk_and_its_line_reproduces_it():
    from user_capsnets.torch_capsnet import squash_eps

    report = check_op("squash", squash_eps, layout="batch caps dim", extremes=False)  # ci: shrinking
    text = str(report)
    assert not report.passed and report.deviation == "squash_epsilon_on_norm"
    f = report.failure
    # Shrunk: the smallest draw Hypothesis reached has one example of one capsule.
    assert f.recipe["shape"][:2] == [1, 1] and report.shrinking["float32"] > 0, f.recipe
    assert "reference" in text and "yours" in text and "smallest failing draw" in text
    line = f.repro
    assert line.startswith("capsspec conformance --op squash=user_capsnets.torch_capsnet:squash_eps")
    recipe = json.loads(line.split("--recipe ", 1)[1].strip("'"))
    assert "--no-extremes" in line
    again = check_op("squash", squash_eps, layout="batch caps dim", extremes=False, recipe=recipe)
    assert again.failure is not None and again.failure.user == pytest.approx(f.user) and again.draws == {"float32": 1}
    assert report.raise_for_failure is not None
    with pytest.raises(AssertionError, match="squash_epsilon_on_norm"):
        report.raise_for_failure()


def test_a_numpy_piece_is_checked_forward_only_unless_it_brings_a_vjp():
    def squash(s):
        n2 = np.sum(s * s, axis=-1, keepdims=True)
        with np.errstate(all="ignore"):
            return np.where(n2 > 0, np.sqrt(n2) / (1 + n2), 0) * s

    report = check_op("capsule_lengths", lambda v: np.sqrt(np.sum(v.astype(np.float64) ** 2, -1)).astype(v.dtype),
                      framework="numpy", profile="meta")
    assert report.passed and any("no autodiff" in n for n in report.notes), str(report)
    wrong_vjp = check_op("squash", squash, framework="numpy", profile="meta", vjp=lambda g, s: (g,))
    assert not wrong_vjp.passed and wrong_vjp.failure.what.startswith("gradient"), str(wrong_vjp)


@pytest.mark.parametrize("layout, message", [
    ("batch caps", "does not name axis 'dim'"),
    ("batch caps dim foo", "unknown axis 'foo'"),
    ("batch caps caps", "named twice"),
])
def test_a_bad_layout_is_one_clear_error_naming_the_axis(layout, message):
    with pytest.raises(ValueError, match=message):
        check_op("squash", lambda s: s, framework="numpy", layout=layout)


def _numpy_squash(s):
    s64 = s.astype(np.float64)
    n2 = np.sum(s64 * s64, axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        return (np.where(n2 > 0, np.sqrt(n2) / (1 + n2), 0) * s64).astype(s.dtype)


def test_an_output_that_does_not_fit_the_layout_names_the_axis():
    # Right values, returned (batch, dim, caps) while the layout says (batch, caps, dim).
    with pytest.raises(ValueError, match=r"layout 'batch caps dim' expects .*: axis '(caps|dim)' has size"):
        check_op("squash", lambda s: np.swapaxes(_numpy_squash(s), 1, 2).copy(), framework="numpy", profile="meta",
                 extremes=False)
    with pytest.raises(ValueError, match="rank 2"):
        check_op("squash", lambda s: s[0], framework="numpy", profile="meta")


def test_the_command_line_checks_a_piece_and_refuses_bad_specs_in_one_line(capsys, monkeypatch):
    monkeypatch.chdir(HERE)  # `user_capsnets` is imported from the current directory
    base = ["--framework", "torch", "--profile", "meta", "--layout", "b n d"]
    assert cli.main(["--op", "squash=user_capsnets.torch_capsnet:squash", *base]) == 0
    assert "PASSED: squash" in capsys.readouterr().out
    # A loss averaged over the classes is wrong on every draw: a failure whatever is drawn.
    assert cli.main(["--op", "margin_loss=user_capsnets.torch_capsnet:margin_loss_mean", "--framework", "torch",
                     "--layout", "batch classes", "--labels", "onehot"]) == 1
    out = capsys.readouterr().out
    assert "(margin_mean_over_classes)" in out and "reproduce with: capsspec conformance --op margin_loss=" in out
    for spec, message in [("squash", "expected PIECE=module:attr"), ("squash=no_such_pkg_xyz:f", "cannot import"),
                          ("squash=user_capsnets.torch_capsnet:nothing", "has no attribute"),
                          ("squash=user_capsnets.torch_capsnet:CASES", "not callable"),
                          ("sqush=user_capsnets.torch_capsnet:squash", "op must be one of")]:
        assert cli.main(["--op", spec, *base]) == 2, spec
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_pytest_fixture_makes_a_users_test_one_line(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        from user_capsnets.torch_capsnet import margin_loss_mean, squash

        def test_my_squash(capsspec_check):
            capsspec_check("squash", squash, layout="batch caps dim")

        def test_my_other_squash(capsspec_check):
            capsspec_check("margin_loss", margin_loss_mean, layout="batch classes", labels="onehot")
    """))
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{HERE}"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "capsspec.conformance.plugin", "-p",
                        "no:cacheprovider", "--conformance-profile", "meta", str(tmp_path / "test_user.py")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "(margin_mean_over_classes)" in out and "no backend chosen" not in out, out


def test_a_routing_that_returns_v_alone_is_checked_on_v_and_its_gradient():
    from user_capsnets.torch_capsnet import ROUTE, routing, routing_fixed_three

    ok = check_op("routing", lambda u_hat, iterations: routing(u_hat, iterations)[0], framework="torch", outputs=1,
                  max_examples=8, **ROUTE)
    assert ok.passed, str(ok)
    bad = check_op("routing", lambda u_hat, iterations: routing_fixed_three(u_hat, iterations)[0], framework="torch",
                   outputs=1, profile="meta", **ROUTE)
    assert not bad.passed and bad.deviation == "iterations_always_3", str(bad)


def _torch_variants():
    """The named deviations that the user-style modules do not carry, as one-line variants of their pieces."""
    torch = pytest.importorskip("torch")
    from user_capsnets import torch_capsnet as T

    def margin(lengths, target, lam=0.5, reduce=lambda per_example: per_example.mean()):
        per_class = target * torch.relu(0.9 - lengths) ** 2 + lam * (1 - target) * torch.relu(lengths - 0.1) ** 2
        return reduce(per_class.sum(dim=1))

    loss = {"layout": "batch classes", "labels": "onehot"}
    return [
        ("routing", lambda u, iterations: T._route(u, 1), T.ROUTE, "iterations_always_1"),
        ("routing", lambda u, iterations: T._route(u, iterations + 1), T.ROUTE, "iterations_off_by_one"),
        ("margin_loss", lambda lengths, t: margin(lengths, t, reduce=torch.sum), loss, "margin_sum_over_batch"),
        ("margin_loss", lambda lengths, t: margin(lengths, t, lam=1.0), loss, "margin_without_lambda"),
        ("reconstruction_loss", lambda r, im: ((r - im.flatten(1)) ** 2).sum(dim=1).mean(), {"layout": "b c h w"},
         "reconstruction_unscaled"),
    ]


@pytest.mark.parametrize("i", range(5))
def test_the_other_named_deviations_are_named(i):
    op, fn, kwargs, expected = _torch_variants()[i]
    report = check_op(op, fn, framework="torch", profile="meta", **kwargs)
    assert not report.passed and report.deviation == expected, str(report)
