"""The one line a failure prints: how a check writes it, and the marker that makes it available.

Every check is a function of (backend, ..., dtype) where everything after the backend is plain
JSON (names, recipes, the dtype), so the call itself can be written as one shell line:

    python -m capsspec.conformance.reproduce '{"check": "op_vjp", "backend": "torch", "device": null,
                                               "args": ["routing", {...recipe...}], "dtype": "float32"}'

(on one line). A backend among the arguments (checkpoint interchange's partner) is written
{"backend": NAME, "device": DEVICE}. @reproducible marks a check: while it runs, current_line()
is its line, which compare.py prints with every failure. reproduce.py reads the line back and
runs the check again.

This module sits below the checks and knows none of them: a check's name is its function's name.
"""

from __future__ import annotations

import contextvars
import functools
import json
import shlex
from typing import Any, Callable, TypeVar

from .selection import Selected

__all__ = ["COMMAND", "line", "reproducible", "current_line"]

# The module that runs a line again (reproduce.py); a line is this command and one JSON argument.
COMMAND = "python -m capsspec.conformance.reproduce"

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
    """The shell line that runs the check named `check` again on (sel, *args); args[-1] is the dtype."""
    payload = {"check": check, "backend": sel.spec, "device": sel.device, "args": _encode(list(args[:-1])),
               "dtype": args[-1]}
    return f"{COMMAND} {shlex.quote(json.dumps(payload))}"


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
