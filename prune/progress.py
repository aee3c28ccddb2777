"""Typed progress: every long loop reports ``Event``s; a terminal bar or a web widget renders them.

Nothing formats progress as prose for another part to parse back: a perplexity window carries its
dataset, dense/pruned, window number and running value as fields.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    stage: str  # load | calibration | statistics | prune | perplexity | tasks | study | generate | done
    fraction: float  # of the whole job, 0..1
    message: str = ""  # for a bar or a status line
    dataset: str | None = None
    which: str | None = None  # "dense" | "pruned"
    step: int | None = None  # windows, layers, requests or points done so far
    steps: int | None = None  # of how many
    value: float | None = None  # the running perplexity (or accuracy)


Progress = Callable[[Event], None]


def silent(event: Event) -> None:
    """A Progress that ignores everything."""


def scaled(progress: Progress, low: float, high: float, prefix: str = "") -> Progress:
    """Re-emit a sub-job's events with their fraction mapped into [low, high] of the whole job."""

    def report(event: Event) -> None:
        message = f"{prefix}: {event.message}" if prefix and event.message else prefix or event.message
        fraction = low + (high - low) * min(max(event.fraction, 0.0), 1.0)
        progress(dataclasses.replace(event, fraction=fraction, message=message))

    return report


# ----- cancellation -------------------------------------------------------------------------------
class CancelToken:
    """A job's cancel flag and time limit. The job's thread installs it (``cancellable``); long
    loops call ``checkpoint()`` (and every ``Progress`` a front end wraps with ``cancelling``), which
    raises ``prune.errors.Cancelled`` once the token is cancelled or past its deadline."""

    def __init__(self, seconds: float | None = None):
        self._event = threading.Event()
        self.reason = "cancelled"
        self.deadline = None if not seconds else time.monotonic() + seconds
        self.seconds = seconds

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel(f"the job ran past its time limit of {self.seconds:g} s; ask for less work")
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled:
            from prune.errors import Cancelled

            raise Cancelled(self.reason)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the token is cancelled."""
        return self._event.wait(seconds) or self.cancelled


_local = threading.local()


def current_token() -> CancelToken | None:
    """The token of the job running in this thread, if any."""
    return getattr(_local, "token", None)


@contextmanager
def cancellable(token: CancelToken | None) -> Iterator[CancelToken | None]:
    """Install ``token`` for this thread for the block (``checkpoint()`` then checks it)."""
    previous = current_token()
    _local.token = token
    try:
        yield token
    finally:
        _local.token = previous


def checkpoint() -> None:
    """Raise ``Cancelled`` if this thread's job was cancelled (a no-op outside a job)."""
    token = current_token()
    if token is not None:
        token.check()


def cancelling(progress: Progress, token: CancelToken | None = None) -> Progress:
    """``progress`` that first checks the cancel token (this thread's when none is given)."""

    def report(event: Event) -> None:
        (token or current_token() or _NEVER).check()
        progress(event)

    return report


_NEVER = CancelToken()
