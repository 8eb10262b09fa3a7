"""Stopping a run cleanly on SIGINT/SIGTERM; no jax here, so the CLI imports it cheaply."""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved at `step`; rerunning resumes from it."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum


class StoppedBetweenRuns(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived after a run's last compiled call, while its records were
    written (seeds on devices, a vmapped group): nothing is lost, but the process stops
    instead of going on to the next seed or experiment (the CLI exits 130)."""


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a request the loop honours at the next chunk boundary."""

    def __init__(self):
        self.requested = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
