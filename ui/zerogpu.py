"""Heavy jobs on ZeroGPU hardware: each one runs inside a ``@spaces.GPU`` call.

What ZeroGPU does (``spaces`` 0.51.3, ``spaces/zero/wrappers.py``): a decorated function runs in a
worker process forked from the app; its arguments reach the worker by pickle and what it yields or
returns comes back by pickle. A worker is kept for the next call only while the scheduler reports
it idle, otherwise the next call forks a fresh one from the app. In the app process itself the
weights "on CUDA" are placeholders, offloaded at launch. So:

- a job (``work``, a closure over the engine, the visitor's session and its settings) is sent as
  its code, which the fork already has, and the values it closes over (``Shipper``); the engine is
  sent by reference and resolves to the worker's own copy;
- the worker's model is in whatever state its last call left, or dense after a fresh fork; the
  Lab there records which state it holds, in the same process as the weights, so a session's
  ``PrunedState`` (shipped with the session, compact) is applied whenever the worker holds another
  (``Engine.pruned``; the Lab there solves a SparseGPT state's values again);
- what a job changes in place does not come back by itself: the session's pruning (its state, recipe,
  run count) and the models the worker loaded are sent back with the result and applied here;
- each call asks for the GPU time its job needs (``ui.hosting.gpu_seconds``) and stops itself
  (``Cancelled``) when that time is up, before ZeroGPU would abort it.
"""

from __future__ import annotations

import importlib
import io
import marshal
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import torch

from evaluation.lab import Lab
from prune.errors import LabError
from prune.progress import CancelToken
from ui.jobs import run_job

# What a job changes in a session (``Engine.run``, a rebuilt state in ``Engine.pruned``); the page's
# own fields (history, studies) are written here, in the app, after the job.
JOB_FIELDS = ("recipe", "state", "evicted", "notice", "masks_model", "runs", "output")

_ENGINES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(engine: Any) -> int:
    """Name ``engine`` so that a job can refer to it in a forked worker (which has a copy)."""
    key = id(engine)
    _ENGINES[key] = engine
    return key


def _engine(key: int):
    return _ENGINES[key]


def _lab(key: int) -> Lab | None:
    """A Lab cannot leave its process (a lock, the weights): the receiving engine's stands in."""
    return _ENGINES[key].lab


def _value(value: Any) -> Any:
    return value


def _function(code: bytes, module: str, name: str, defaults, kwdefaults, cells: tuple):
    function = types.FunctionType(
        marshal.loads(code), sys.modules[module].__dict__, name, defaults, tuple(map(types.CellType, cells))
    )
    function.__kwdefaults__ = kwdefaults
    return function


class Shipper(pickle.Pickler):
    """Pickles a job or its results between the app and a worker forked from it: a closure by its
    code and module (both processes run the same source) and the values of its cells; modules, the
    engine and its Lab by reference; tensors as CPU copies."""

    def __init__(self, file, engine_key: int):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.engine_key = engine_key

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and "<locals>" in obj.__qualname__:
            cells = tuple(cell.cell_contents for cell in obj.__closure__ or ())
            code = marshal.dumps(obj.__code__)
            return _function, (
                code,
                obj.__module__,
                obj.__name__,
                obj.__defaults__,
                obj.__kwdefaults__,
                cells,
            )
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return _value, (obj.detach().cpu(),)
        if isinstance(obj, Lab):
            return _lab, (self.engine_key,)
        if _ENGINES.get(id(obj)) is obj:
            return _engine, (id(obj),)
        return NotImplemented


def ship(engine: Any, value: Any) -> bytes:
    buffer = io.BytesIO()
    Shipper(buffer, register(engine)).dump(value)
    return buffer.getvalue()


# ----- in the worker ---------------------------------------------------------------------------------
def worker(blob: bytes, seconds: int) -> Iterator[bytes]:
    """The ``@spaces.GPU`` generator: run the shipped job here, yield its events, then the session's
    new state, the models this worker loaded, and the result (or the error), each shipped."""
    engine, session, work = pickle.loads(blob)
    known, swaps = set(engine.known), engine.swaps
    token = CancelToken(seconds=seconds)  # stop cleanly before ZeroGPU's own limit aborts the call
    try:
        with closing(run_job(work, token, join=True)) as events:
            for kind, payload in events:
                if kind == "done":
                    result = payload
                else:
                    yield ship(engine, (kind, payload))
    except Exception as err:  # noqa: BLE001 - sent to the app, which raises it there
        try:
            shipped = ship(engine, ("error", err))
        except Exception:  # noqa: BLE001 - an error that does not pickle: its words do
            shipped = ship(engine, ("error", LabError(f"{type(err).__name__}: {err}")))
        yield shipped
        return
    facts = {
        "known": {name: entry for name, entry in engine.known.items() if name not in known},
        "swaps": engine.swaps - swaps,
        "last_load_s": engine.last_load_s,
    }
    yield ship(engine, ("state", ({f: getattr(session, f) for f in JOB_FIELDS}, facts)))
    yield ship(engine, ("done", result))


def requested_seconds(blob: bytes, seconds: int) -> int:
    """``spaces.GPU(duration=...)``: called with the job's own arguments."""
    return seconds


def gpu_function() -> Callable[[bytes, int], Iterator[bytes]]:
    """``worker`` as a ``spaces.GPU`` function; made once, before the app launches: ``spaces``
    reports the app's GPU functions at launch, and every worker is forked with them."""
    import spaces

    return spaces.GPU(duration=requested_seconds)(worker)


# ----- in the app ------------------------------------------------------------------------------------
def run(
    gpu: Callable[[bytes, int], Iterator[bytes]],
    engine: Any,
    session: Any,
    work: Callable,
    seconds: int,
    emit: Callable[[str, Any], None],
) -> Any:
    """Run ``work`` through ``gpu`` (a ``spaces.GPU`` function) and pass its events to ``emit``;
    returns its result once the call has ended. A cancel (``emit`` raises) closes the call early,
    which stops the worker's job at its next event."""
    done = False
    with closing(gpu(ship(engine, (engine, session, work)), seconds)) as calls:
        for data in calls:
            kind, payload = pickle.loads(data)
            if kind == "error":
                raise payload
            if kind == "state":
                fields, facts = payload
                for name, value in fields.items():
                    setattr(session, name, value)
                if session.state is not None:  # within the app's budget, which the worker's copy is not
                    engine.sessions.keep(session, session.state)
                engine.known.update(facts["known"])
                engine.swaps += facts["swaps"]
                engine.last_load_s = facts["last_load_s"]
            elif kind == "done":
                done, result = True, payload
            else:
                emit(kind, payload)
    if not done:
        raise LabError("the GPU worker stopped before the job finished")
    return result
