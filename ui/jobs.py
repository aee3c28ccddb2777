"""Background jobs: a heavy job runs in its own thread and streams what it emits to the handler."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prune.progress import CancelToken, cancellable

Emit = Callable[[str, Any], None]


def run_job(
    work: Callable[[Emit], Any], token: CancelToken | None = None, join: bool = False
) -> Iterator[tuple[str, Any]]:
    """Run ``work(emit)`` in its own thread and yield what it emits, then ``("done", result)``.

    Gradio advances a sync generator from changing worker threads, so a lock held across
    ``yield``s would be released by the wrong thread; the job's thread holds it instead. The job's
    thread has ``token`` installed (``prune.progress.checkpoint``) and the caller's context (the
    Gradio request: ZeroGPU bills the visitor who asked); closing this iterator (the page went
    away) cancels it, and every ``emit`` checks it. With ``join`` closing also waits for the thread
    (a ZeroGPU worker has no job queue to keep the next call off the model)."""
    events: queue.Queue = queue.Queue()
    token = token or CancelToken()

    def emit(kind: str, payload: Any) -> None:
        token.check()  # stops the job at its next report
        events.put((kind, payload))

    def target() -> None:
        try:
            with cancellable(token):
                events.put(("done", work(emit)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            events.put(("error", err))

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(target,), daemon=True, name="lab-job"
    )
    thread.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        token.cancel("the page that started this job is gone")
        if join:
            thread.join()
