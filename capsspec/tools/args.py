"""The command lines' one parser contract, shared by `capsspec` and its bench and gpu-check tools.

Every command line refuses a bad flag or value in ONE line (what was wrong, the flag, where to
read more) with exit status 2, never argparse's whole usage text or a traceback; accepts no
abbreviated flags (`--epoch 2` is not `--epochs 2`); and checks its output paths before any work
(check_out_folder, check_out_file). The value types here name the flag through argparse's own
"argument --flag: ..." prefix, never an internal field.
What this module must never do: import a framework, or import any other command-line module.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

__all__ = ["OneLineParser", "UsageError", "int_in", "finite_float", "check_out_folder", "check_out_file", "backend_option"]


class UsageError(ValueError):
    """A problem with the command line itself (reported in one line, exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line: what was wrong and where to read more, not the whole usage.
    Abbreviated flags are refused (allow_abbrev=False), here and in every subparser made from it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")

    def unrecognized(self, extra: Sequence[str]) -> NoReturn:
        """Refuse flags this (sub)command does not know, suggesting the closest one it does."""
        known = [o for a in self._actions for o in a.option_strings]
        flag = next((a.split("=", 1)[0] for a in extra if a.startswith("-")), "")
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag else []
        if not close and flag.startswith("--"):  # an abbreviation: name the flags it could stand for
            close = [o for o in known if o.startswith(flag)][:1]
        hint = f" (did you mean {close[0]}? flags are never abbreviated)" if close else ""
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.unrecognized(extra)
        return parsed


def int_in(minimum: int, maximum: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum], refused with a message that says the range."""
    kind = what or ("positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above the limit of {maximum}")
        return value
    return parse


def finite_float(minimum: float = -math.inf, *, exclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above (or at least) minimum; NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if exclusive else value >= minimum
        if not math.isfinite(value) or not low_ok:
            bound = f"above {minimum:g}" if exclusive else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
        return value
    return parse


def check_out_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be one: an existing file, a path through a file, no permission."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder: name a new or existing folder instead")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path} goes through {parent}, which is a file, so no folder can be made "
                                 f"there: name a folder elsewhere")
            if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: no permission to create a folder in {parent}: name a folder "
                                 f"you can write to")
            break
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in that folder: name a folder you can write to")


def check_out_file(path: str | os.PathLike, flag: str) -> None:
    """Refuse an output file name that is a folder, lies under a file, or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder: name a file to write, e.g. {Path(path) / 'report.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path}: no permission to write that file: name a file you can write to")
    check_out_folder(p.parent, f"{flag} {path}: its folder")


def backend_option(text: str) -> tuple[str, Any]:
    """--backend-option KEY=VALUE: the key, and the value as a bool (true/false, yes/no, on/off), an int, a
    float, or else the text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    low = raw.lower()
    value: Any
    if low in ("true", "yes", "on"):
        value = True
    elif low in ("false", "no", "off"):
        value = False
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key, value
