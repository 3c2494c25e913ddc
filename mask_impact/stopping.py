"""SIGINT and SIGTERM, handled alike at every stage of a run.

Both signals raise ``Stopped`` (a ``KeyboardInterrupt``) in the main thread, so Ctrl-C, ``kill`` and
a batch scheduler's time-out (Slurm sends SIGTERM) all unwind through the same ``finally`` blocks:
finished knockouts stay in the partial file, temporary files are removed, and the command line says
what was kept and exits with 128 + the signal's number. ``signals_deferred`` holds both back for the
few renames that put a run's result files in place together. This module imports nothing heavy, so the
entry points (entry.py) install the handlers before torch and transformers start loading.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame) -> None:
    raise Stopped(signum)


def stop_status(stop: KeyboardInterrupt) -> tuple[str, int]:
    """The signal's name and the exit status for a stop (a plain KeyboardInterrupt is SIGINT).

    Called where a stop is handled: from then on further stop signals are ignored, so a second Ctrl-C
    cannot interrupt the handling (or the interpreter's shutdown) with a traceback."""
    ignore_stop_signals()
    signum = getattr(stop, "signum", signal.SIGINT)
    return signal.Signals(signum).name, 128 + signum


def ignore_stop_signals() -> None:
    try:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``Stopped``; the previous handlers come back after."""
    try:
        saved = {signum: signal.signal(signum, _raise) for signum in SIGNALS}
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then arrive as usual.

    The signals are blocked in this thread (``pthread_sigmask``), and one that another thread catches is
    only noted by a stand-in handler (Python runs handlers in the main thread); both are delivered after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise ``Stopped`` in the main thread from now on."""
    for signum in SIGNALS:
        signal.signal(signum, _raise)
