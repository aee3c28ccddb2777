"""Every exception a job can raise becomes a short message in the page, never a traceback.

The app must keep serving after a bad model id, a bad value, an empty prompt or running out of
memory, so handlers are wrapped in ``user_errors`` and the model is left in a known state.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
from collections.abc import Callable

import gradio as gr
import torch

from evaluation.allocate import AllocationError
from evaluation.generate import GenerationError
from evaluation.perplexity import EvaluationError
from evaluation.studies import StudyError
from prune.calibration import CalibrationError
from prune.data import DataError
from prune.models import ModelLoadError
from prune.recipe import RecipeError
from ui.engine import JobCancelled, StaleSession

log = logging.getLogger("pruning-lab")

USER_ERRORS: tuple[type[BaseException], ...] = (
    ModelLoadError,
    RecipeError,
    GenerationError,
    CalibrationError,
    DataError,
    EvaluationError,
    StaleSession,
    StudyError,
    AllocationError,
    FileNotFoundError,
)
OOM_MESSAGE = (
    "Out of memory. Lower the calibration samples or sequence length, the evaluation windows, "
    "the new tokens, or pick a smaller model. The app is still running."
)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_message(err: BaseException) -> gr.Error:
    """The ``gr.Error`` a person sees for ``err``."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, USER_ERRORS):
        text = str(err).strip("'\"") if isinstance(err, FileNotFoundError) else str(err)
        return gr.Error(text, print_exception=False)
    if is_oom(err):
        free_memory()
        return gr.Error(OOM_MESSAGE, title="Out of memory", print_exception=False)
    if isinstance(err, JobCancelled):
        return gr.Error(str(err), print_exception=False)
    log.exception("unexpected error in a job", exc_info=err)
    return gr.Error(
        f"Unexpected error ({type(err).__name__}: {str(err)[:300]}). The app is still running.",
        print_exception=False,
    )


def user_errors(fn: Callable) -> Callable:
    """Decorate a handler (plain or generator) so that failures reach the page as messages."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except GeneratorExit:
                raise
            except BaseException as err:  # noqa: BLE001 - every failure becomes a message
                raise to_message(err) from None

        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - every failure becomes a message
            raise to_message(err) from None

    return plain
