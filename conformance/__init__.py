"""capsspec's conformance suite: a backend that passes it computes what the reference computes.

Run it with `capsspec conformance --backend NAME` (or `python -m capsspec.conformance`), or with
pytest: `python -m pytest --pyargs capsspec.conformance -p capsspec.conformance.plugin --backend NAME`
(from a checkout, `python -m pytest conformance --backend NAME`). NAME is a registered backend,
"module:attr" for one that is not registered yet, or (command line only) "all".

Modules, each importing only from those before it: tolerances (the one tolerance table),
selection (choosing the backend, loudly), compare (comparisons, failure messages, statistics),
repro_line (the one line a failure prints), cases (recipes to inputs), strategies (named
Hypothesis building blocks of recipes), magnitudes (term sizes, so that tolerances follow
conditioning), records (one record per op: its recipes, how its case is built, its tolerance
levels, its magnitude functions, its error inputs; and the model functions' error inputs),
check_kit (what the checks share), the checks by subject (op_checks, model_checks,
optimizer_checks, property_checks, contract_checks: the error contract and purity), checks (every
check by name), reproduce (runs a failure's line again), regressions (draws kept for good),
profiles, plugin (pytest options, profiles, known gaps, inference-only backends, summary), cli,
broken (deliberately broken backends for the tests of the tester), and the test_*.py modules.
Checking a user's own CapsNet pieces (docs/check-your-own.md) builds on them: frameworks (calling
a torch / TensorFlow / JAX / NumPy function on NumPy inputs, gradients through its autodiff),
layouts (named axes), own_head (the capsule head as one piece), own_ops (each piece's draws and
tensors), deviations (the known mistakes, named) and own (check_op, assert_conforms, Report:
importable from this package, loaded on first use). A user's whole model (docs/import-your-model.md):
param_mapping (their parameter names and axis layouts to and from the canonical ones, pure NumPy,
shared with `capsspec import`), model_deviations (the reference's stages and the known whole-model
mistakes) and user_model (check_model, ModelReport; importable from this package too).
known_gaps/<backend>.txt lists what a backend is known not to meet yet.

Importing this package imports nothing (no framework, no Hypothesis).
"""

__all__ = ["check_op", "assert_conforms", "Report", "check_model", "ModelReport", "ParamMapping", "load_mapping",
           "parse_mapping"]
_OWN = ("check_op", "assert_conforms", "Report")
_MAPPING = ("ParamMapping", "load_mapping", "parse_mapping")


def __getattr__(name: str):  # the public API of "Check your own CapsNet", imported on first use
    if name in _OWN:
        from . import own

        return getattr(own, name)
    if name in _MAPPING:
        from . import param_mapping

        return getattr(param_mapping, name)
    if name in __all__:
        from . import user_model

        return getattr(user_model, name)
    raise AttributeError(f"module 'capsspec.conformance' has no attribute {name!r}")
