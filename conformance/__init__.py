"""capsspec's conformance suite: a backend that passes it computes what the reference computes.

Run it with `capsspec conformance --backend NAME` (or `python -m capsspec.conformance`), or with
pytest: `python -m pytest --pyargs capsspec.conformance -p capsspec.conformance.plugin --backend NAME`
(from a checkout, `python -m pytest conformance --backend NAME`). NAME is a registered backend,
"module:attr" for one that is not registered yet, or (command line only) "all".

Modules: selection (choosing the backend, loudly), tolerances (the one tolerance table),
strategies (Hypothesis recipes), cases (recipes to inputs), magnitudes (term sizes for
cancelling values), compare (comparisons, failure messages, statistics), checks (each check,
callable from a reproduction snippet), plugin (pytest options, profiles, known gaps, summary),
profiles, cli, broken (deliberately broken backends for the tests of the tester), and the
test_*.py modules. known_gaps/<backend>.txt lists what a backend is known not to meet yet.

Importing this package imports nothing (no framework, no Hypothesis).
"""
