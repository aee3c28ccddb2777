"""What every tab shares: how events queue, the progress default, figure boxes, the widgets of the
Prune tab that other tabs drive, and the one place a job's failure becomes a message.

Tabs import from here (and from ``engine``, ``recipes``, ``plots``), never from each other.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from evaluation.share import scrub_paths
from prune.errors import Cancelled, OutOfMemory, as_lab_error

log = logging.getLogger("pruning-lab")

# One heavy job on the model at a time, across every tab and user: ``Engine.heavy`` admits a job
# (or refuses it: public, one running and one waiting per session) and queues it first come, first
# served, showing the position. A waiting heavy handler holds a Gradio thread, so every heavy event
# is in one concurrency group whose limit is the queue's default, the host's ``heavy_threads``
# (``app.main``): what waits beyond it waits in Gradio's queue (``queue_size``) without a thread,
# and the other threads (``LIGHT_THREADS``) stay free, so readouts and Cancel always answer.
HEAVY_GROUP = "heavy"
HEAVY = dict(concurrency_id=HEAVY_GROUP, concurrency_limit="default")
LIGHT = dict(concurrency_limit=None, show_progress="hidden")
LIGHT_THREADS = 36  # Gradio threads beside the heavy ones (Gradio's own default: 40 in all)
# Heavy-group threads beyond the model's line: a request is admitted or refused only once it has a
# heavy thread, so with every line place held by a waiting job a visitor's burst would wait there
# for its refusals, and other visitors' first jobs behind it. These threads refuse it at once.
REFUSING_THREADS = 4


def heavy_group_threads(line: int | None) -> int | None:
    """Gradio threads of the heavy group for a line of ``line`` jobs (None: no limit)."""
    return None if line is None else line + REFUSING_THREADS


# Gradio gives each call a fresh tracker in place of this default (blocks.create_tracker), so one
# module-level instance is safe to share.
PROGRESS = gr.Progress()


@dataclass
class LabTab:
    """The Prune tab's widgets that other tabs use (the Allocate button fills the role sliders)."""

    session: gr.State
    model_md: gr.Markdown
    sliders: dict[str, gr.Slider]
    controls: dict[str, gr.components.Component]
    readout_md: gr.Markdown
    refresh_outputs: list
    readout_event: dict  # the readout's event wiring, for widgets on other tabs that move sliders


def figure_box(label: str) -> gr.Image:
    """A rendered figure; its title is inside the image, so no label badge covers it."""
    return gr.Image(label=label, show_label=False, type="pil", format="png", interactive=False)


def no_api(event: dict) -> dict:
    """The same event wiring without a second API endpoint."""
    return {**event, "api_name": False}


# ----- errors --------------------------------------------------------------------------------------
# The app must keep serving after a bad model id, a bad value, an empty prompt or running out of
# memory: every handler is wrapped in ``user_errors``, and the model is left in a known state.
# Messages lose server paths (``evaluation.share.scrub_paths``).


def to_message(err: BaseException) -> gr.Error:
    """The ``gr.Error`` a person sees for ``err``: a LabError's own words (no server paths), else a
    short bug note."""
    if isinstance(err, gr.Error):
        return gr.Error(scrub_paths(str(err.message)), title=err.title, print_exception=False)
    lab_error = as_lab_error(err)  # running out of memory is one (memory is freed first)
    if isinstance(lab_error, OutOfMemory):
        return gr.Error(
            f"{lab_error}. The app is still running.", title="Out of memory", print_exception=False
        )
    if isinstance(lab_error, Cancelled):
        return gr.Error(f"Stopped: {scrub_paths(str(lab_error))}.", title="Cancelled", print_exception=False)
    if lab_error is not None:
        return gr.Error(scrub_paths(str(lab_error)), print_exception=False)
    log.exception("unexpected error in a job", exc_info=err)
    return gr.Error(
        f"Unexpected error ({type(err).__name__}: {scrub_paths(str(err))[:300]}). The app is still running.",
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
