"""Loads the suite's pytest plugin when the suite runs from a checkout: `python -m pytest conformance --backend NAME`.

From an installed package, pass the plugin explicitly:
`python -m pytest --pyargs capsspec.conformance -p capsspec.conformance.plugin --backend NAME`
(the `capsspec conformance` command does this).
"""

pytest_plugins = ["capsspec.conformance.plugin"]
