"""Stopping a run cleanly: SIGUSR1 (SLURM's notice) and SIGTERM ask the training loop to stop after its
current step with its resume state written; :class:`RunInterrupted` says so to the caller."""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Iterator


class RunInterrupted(Exception):
    """A run stopped on SIGUSR1/SIGTERM (a scheduler's notice or the grid runner stopping): its resume state is
    written; running it again resumes it. Not a failure."""


@dataclass
class StopRequest:
    """Set by the signal handlers of :func:`stop_signals`; the training loop checks it after every step."""

    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals() -> Iterator["StopRequest"]:
    """While training: SIGUSR1 (SLURM's ``--signal`` notice) and SIGTERM (preemption, the grid runner) ask the run
    to stop after its current step with its resume state written, instead of killing it mid-write. Only in the
    main thread (where Python delivers signals); elsewhere nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001
        stop.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
