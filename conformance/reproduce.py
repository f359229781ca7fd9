"""Reproducing one failing check from the one line a failure prints (repro_line.py writes it).

    python -m capsspec.conformance.reproduce '{"check": "op_vjp", "backend": "torch", "device": null,
                                               "args": ["routing", {...recipe...}], "dtype": "float32"}'

runs that check of checks.py again on the same inputs and prints its comparison: "passed", or the
failure message with the largest errors. A backend among the arguments (checkpoint interchange's
partner), written {"backend": NAME, "device": DEVICE}, is resolved like the line's own backend.

What this module must never do: run anything but the named check of checks.py, or choose a
backend the line does not name.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from . import checks
from .selection import SelectionError, resolve_backend

__all__ = ["run", "main"]


def _decode(a: Any) -> Any:
    if isinstance(a, dict) and set(a) == {"backend", "device"}:
        return resolve_backend(a["backend"], a["device"])
    return a


def run(payload: dict[str, Any]) -> None:
    """Run the check a reproduction line describes (raises what the check raises)."""
    fn = getattr(checks, payload["check"], None)
    if fn is None or payload["check"] not in checks.__all__:
        raise ValueError(f"check must be one of {checks.__all__}, got {payload['check']!r}")
    sel = resolve_backend(payload["backend"], payload.get("device"))
    fn(sel, *[_decode(a) for a in payload.get("args", [])], payload["dtype"])


def main(argv: list[str] | None = None) -> int:
    """The command line: one argument, the JSON of a reproduction line; 0 passed, 1 failed, 2 bad line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m capsspec.conformance.reproduce 'JSON' (the line a failure printed)", file=sys.stderr)
        return 2
    try:
        payload = json.loads(argv[0])
        run(payload)
    except (SelectionError, json.JSONDecodeError) as exc:
        print(f"capsspec conformance: {exc}", file=sys.stderr)
        return 2
    except AssertionError as exc:
        print(f"FAILED: {exc}")
        return 1
    print(f"passed: {payload['check']} on backend {payload['backend']!r} ({payload['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
