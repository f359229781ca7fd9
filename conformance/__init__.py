"""capsspec's conformance suite: a backend that passes it computes what the reference computes.

Run it with `capsspec conformance --backend NAME` (or `python -m capsspec.conformance`), or with
pytest: `python -m pytest --pyargs capsspec.conformance -p capsspec.conformance.plugin --backend NAME`
(from a checkout, `python -m pytest conformance --backend NAME`). NAME is a registered backend,
"module:attr" for one that is not registered yet, or (command line only) "all".

Modules: records (one record per op: its recipes, how a case is built, its tolerance levels,
its magnitude functions, its error inputs; and the model functions' error inputs), selection
(choosing the backend, loudly), tolerances (the one tolerance table), strategies (named
Hypothesis building blocks of recipes), cases (recipes to inputs), magnitudes (term sizes, so
that tolerances follow conditioning), compare (comparisons, failure messages, statistics),
checks (each check, including the error contract and purity), reproduce (the one line a failure
prints, and what runs it), regressions (draws kept for good), plugin (pytest options, profiles,
known gaps, inference-only backends, summary), profiles, cli, broken (deliberately broken
backends for the tests of the tester), and the test_*.py modules. known_gaps/<backend>.txt lists
what a backend is known not to meet yet.

Importing this package imports nothing (no framework, no Hypothesis).
"""
