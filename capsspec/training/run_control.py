"""What a user sees and does while a run trains: its progress bar, and the stop signals.

SIGINT (Ctrl-C) and SIGTERM let the step under way finish; the trainer then checkpoints it and
stops (a second signal stops at once). The progress bar is tqdm's when the "train" extra is
installed, sparse when the output is not a terminal, and absent when no stream is given.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, TextIO

__all__ = ["StopSignals", "NoBar", "progress_bar"]


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while training: the step under way finishes, then the run stops.

    The first signal only sets `received` (a step may be updating parameters in place, so it is
    never cut short); the trainer checks it between steps and evaluation batches. A second signal
    raises KeyboardInterrupt at once. Handlers can only be installed from the main thread;
    elsewhere, and for a signal the process ignores, nothing is installed.
    """

    def __init__(self, announce: TextIO | None) -> None:
        self.received: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "an interrupt"

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        # os.write, not print: a buffered stream may be mid-write when the signal lands.
        note = (f"\ncapsspec: {self.name} received: finishing the step under way, then writing a checkpoint "
                "(a second one stops at once and keeps the last checkpoint written)\n")
        try:
            os.write(self.announce.fileno(), note.encode())  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            pass


class NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...
    def close(self) -> None: ...


def progress_bar(progress: TextIO | None, show_bar: bool, total: int, done: int, label: str) -> Any:
    """tqdm's progress bar on `progress` (sparse updates when it is not a terminal); a no-op without one."""
    if progress is None or not show_bar:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the "train" extra brings it; without it, one line per epoch
        return NoBar()
    tty = bool(getattr(progress, "isatty", lambda: False)())
    return tqdm(total=total, initial=done, desc=label, unit="step", file=progress, leave=False, dynamic_ncols=True,
                mininterval=0.2 if tty else 30.0, ascii=not tty)
