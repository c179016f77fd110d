"""SIGTERM as an exception, so `finally` blocks and writers' abort paths run.

Why: by default SIGTERM ends Python at once, and a tool killed mid-write left its hidden
temporary .rec (possibly GBs) behind. Inside `sigterm_raises()` a SIGTERM raises `Terminated`
(a SystemExit, so `except Exception` does not swallow it); the tool can then report it.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, List


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives inside `sigterm_raises()`."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated; the previous handler is restored after."""
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends (a commit of several renames runs whole);
    a signal that came meanwhile is then re-raised to the handler that was in place. Handlers
    (not a signal mask) so that a signal delivered to another thread, e.g. a progress bar's,
    waits too. Outside the main thread, where handlers cannot be set, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    held = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


def stopped_message(tool: str, exc: BaseException, target: object) -> str:
    """The one line a tool prints when SIGTERM or Ctrl-C stopped it while writing `target`."""
    what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"
    return (f"{tool}: stopped by {what} while writing {target}; its temporary files were "
            "removed and nothing was left half-written; run the command again to redo it")


def exit_code(exc: BaseException) -> int:
    """Shell convention: 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
