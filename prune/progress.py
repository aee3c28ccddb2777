"""Typed progress: every long loop reports ``Event``s; a terminal bar or a web widget renders them.

Nothing formats progress as prose for another part to parse back: a perplexity window carries its
dataset, dense/pruned, window number and running value as fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
