"""SIGTERM as an exception for the programs in this folder, so `finally` blocks and the
library writers' abort paths run, and the one line and exit code a stopped program reports.

Why: by default SIGTERM ends Python at once, and a tool killed mid-write left its hidden
temporary .rec (possibly GBs) behind. Inside `sigterm_raises()` a SIGTERM raises `Terminated`
(a SystemExit, so `except Exception` does not swallow it); the tool can then report it. (The
library holds signals only around a commit's renames: `facetrain.build.writer.signals_deferred`.)
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


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


def stopped_message(tool: str, exc: BaseException, target: object) -> str:
    """The one line a tool prints when SIGTERM or Ctrl-C stopped it while writing `target`."""
    what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"
    return (f"{tool}: stopped by {what} while writing {target}; its temporary files were "
            "removed and nothing was left half-written; run the command again to redo it")


def exit_code(exc: BaseException) -> int:
    """Shell convention: 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
