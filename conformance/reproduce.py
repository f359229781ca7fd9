"""Reproducing one failing check from the one line a failure prints.

Every check of checks.py is a function of (backend, ..., recipe, dtype) where everything after the
backend is plain JSON (names, recipes, the dtype). A failure prints

    python -m capsspec.conformance.reproduce '{"check": "op_vjp", "backend": "torch", "device": null,
                                               "args": ["routing", {...recipe...}], "dtype": "float32"}'

(on one line), which runs that check again on the same inputs and prints its comparison: "passed",
or the failure message with the largest errors. A backend among the arguments (checkpoint
interchange's partner) is written {"backend": NAME, "device": DEVICE}.

What this module must never do: run anything but the named check of checks.py, or choose a
backend the line does not name.
"""

from __future__ import annotations

import contextvars
import functools
import json
import shlex
import sys
from typing import Any, Callable, TypeVar

from .selection import Selected, SelectionError, resolve_backend

__all__ = ["line", "reproducible", "current_line", "run", "main"]

_LINE: contextvars.ContextVar[str] = contextvars.ContextVar("capsspec_conformance_repro", default="")
F = TypeVar("F", bound=Callable[..., Any])


def _encode(a: Any) -> Any:
    if isinstance(a, Selected):
        return {"backend": a.spec, "device": a.device}
    if isinstance(a, dict):
        return {k: _encode(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return [_encode(v) for v in a]
    return a


def line(check: str, sel: Selected, *args: Any) -> str:
    """The shell line that runs checks.<check>(sel, *args) again; args[-1] is the dtype."""
    payload = {"check": check, "backend": sel.spec, "device": sel.device, "args": _encode(list(args[:-1])),
               "dtype": args[-1]}
    return f"python -m capsspec.conformance.reproduce {shlex.quote(json.dumps(payload))}"


def current_line() -> str:
    """The reproduction line of the check running now (empty outside a check)."""
    return _LINE.get()


def reproducible(fn: F) -> F:
    """Marks a check: while it runs, current_line() is its reproduction line, and any exception other
    than a conformance failure (which prints the line itself) gets the line as a note."""
    @functools.wraps(fn)
    def wrapper(sel: Selected, *args: Any) -> Any:
        text = line(fn.__name__, sel, *args)
        token = _LINE.set(text)
        try:
            return fn(sel, *args)
        except AssertionError:
            raise
        except Exception as exc:
            exc.add_note(f"capsspec conformance: {fn.__name__} raised; reproduce with: {text}")
            raise
        finally:
            _LINE.reset(token)
    return wrapper  # type: ignore[return-value]


def _decode(a: Any) -> Any:
    if isinstance(a, dict) and set(a) == {"backend", "device"}:
        return resolve_backend(a["backend"], a["device"])
    return a


def run(payload: dict[str, Any]) -> None:
    """Run the check a reproduction line describes (raises what the check raises)."""
    from . import checks

    fn = getattr(checks, payload["check"], None)
    if fn is None or payload["check"] not in checks.__all__:
        raise ValueError(f"check must be one of {checks.__all__}, got {payload['check']!r}")
    sel = resolve_backend(payload["backend"], payload.get("device"))
    fn(sel, *[_decode(a) for a in payload.get("args", [])], payload["dtype"])


def main(argv: list[str] | None = None) -> int:
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
