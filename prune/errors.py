"""One base class for everything a person can cause, so each front end catches it once.

A ``LabError``'s message says what to change; front ends print it (CLI: one line, exit 2) or show
it (app: a message) and carry on. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc

import torch


class LabError(Exception):
    """A request the lab cannot carry out as asked; the message says what to change."""


class RecipeError(LabError, ValueError):
    """A recipe or flag that cannot be run."""


class OutOfMemory(LabError):
    """The job ran out of CPU or GPU memory; the model is left as the next job expects."""


class Cancelled(LabError):
    """A job stopped because whoever asked for it went away."""


OOM_MESSAGE = (
    "out of memory: lower the calibration samples or sequence length, the evaluation windows or "
    "the new tokens, or pick a smaller model"
)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def as_lab_error(err: BaseException) -> LabError | None:
    """``err`` as a LabError (running out of memory is one: memory is freed first), None for bugs."""
    if isinstance(err, LabError):
        return err
    if is_out_of_memory(err):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return OutOfMemory(OOM_MESSAGE)
    return None
