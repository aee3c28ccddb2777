"""The coordinator the tabs use: the one model the app serves, each session's pruned state, and
heavy jobs in line.

Isolation: the model in memory is shared, so every heavy job goes through the ``Lab``, which holds
its lock and puts the model into the state of the session that asked (``lab.run`` for a new run,
``Engine.pruned(session)`` for that session's state, ``lab.dense()``) before it reads a weight.
Sessions and their compact states live in ``ui.sessions``, the line of jobs in ``ui.job_queue``,
what is known about each model in ``ui.registry``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.lab import Lab, RunResult
from prune.errors import Cancelled, LabError, OutOfMemory
from prune.jobs import JobSize
from prune.progress import Event, Progress, cancellable, silent
from prune.recipe import Recipe
from prune.state import PrunedState
from runtime.memory import DoesNotFit, available, state_budget
from runtime.models import OFFLINE_MODELS, ModelLoadError
from ui import zerogpu
from ui.host import trim_heap
from ui.hosting import REFUSED_MODEL, Hosting, ModelRefused, does_not_fit, gpu_seconds
from ui.job_queue import JobQueue
from ui.jobs import Emit, run_job
from ui.recipes import ModelShape
from ui.registry import KNOWN_MODELS, ModelFacts, facts
from ui.sessions import PackedState, Session, SessionBook, StaleSession

EVICTED = "your pruned model was evicted to make room for other visitors"


class Engine:
    """Holds the one loaded model (a ``Lab``) for every session. Each session owns its model choice:
    a job whose session wants another model swaps models first (between jobs, never during one),
    so one visitor's switch never changes what another visitor's next job runs on."""

    def __init__(self, device: str = "auto", dtype: str = "auto", hosting: Hosting | None = None):
        self.device = device
        self.dtype = dtype
        self.hosting = hosting or Hosting.local()
        self.lab: Lab | None = None
        self.default_model: str | None = None
        self.token = 0  # bumped by every successful load
        self.offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokens_per_s: float | None = None  # last measured forward throughput (for time estimates)
        self._load_lock = threading.Lock()
        self.known: dict[str, ModelFacts] = {}  # model name -> what light handlers need
        # the line for the model is as long as the heavy threads that wait in it, at most
        self.jobs = JobQueue(self.hosting.limits.heavy_threads)
        self.sessions = SessionBook(self.hosting)
        self.swaps = 0
        self.last_load_s = 0.0
        # ZeroGPU (``ui.zerogpu``): the ``spaces.GPU`` function every heavy job runs in; None: here
        self.gpu: Callable[[bytes, int], Iterator[bytes]] | None = None
        zerogpu.register(self)

    # ----- the model ------------------------------------------------------------------------------
    def load(self, name: str, progress: Progress = silent, token: bool | None = None) -> Lab:
        """Load ``name``; the old model keeps serving until the new one has loaded."""
        name = (name or "").strip()
        if not name:
            raise ModelLoadError("no model given: pick one from the list or type a hub id or local folder")
        with self._load_lock:
            start = time.perf_counter()
            if self.lab is not None:
                self.lab.drop_caches()  # one model's caches in memory at a time, even while loading
            try:
                lab = Lab.open(
                    Recipe(model=name, dtype=self.dtype, device=self.device),
                    progress,
                    token=None if token is None or token else False,
                )
            except DoesNotFit as err:
                raise DoesNotFit(does_not_fit(self.hosting.display(name), err), err.shortfall) from None
            except ModelLoadError as err:
                if self.hosting.public:
                    raise ModelRefused(
                        f"{REFUSED_MODEL} Choose one of: {', '.join(self.hosting.allowed())}."
                    ) from None
                if self.offline and name not in OFFLINE_MODELS and not Path(name).expanduser().is_dir():
                    raise ModelLoadError(
                        f"{err} This server cannot reach the Hugging Face Hub, so only the offline models "
                        f"({', '.join(OFFLINE_MODELS)}), local folders and models in the hub cache load here."
                    ) from None
                raise
            old, self.lab = self.lab, lab
            if old is not None:
                old.restore()  # waits for a job still running on the old model
            self.token += 1
            self.tokens_per_s = None
            self.last_load_s = time.perf_counter() - start
            if self.default_model is None:
                self.default_model = lab.loaded.name
            if self.hosting.public and self.sessions.budget is None:  # the memory plan's, once
                self.sessions.budget = state_budget(available("cpu"))
            self._remember(lab)
            del old
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self.lab

    def _remember(self, lab: Lab) -> None:
        """What light handlers need about a model without touching it (bounded)."""
        name = lab.loaded.name
        if len(self.known) >= KNOWN_MODELS and name not in self.known:
            self.known.pop(next(iter(self.known)))
        self.known[name] = facts(lab, self.dtype, self.device)

    def model_for(self, session: Session | None) -> str:
        """The model a session works on: its own choice, else the host's default."""
        if session is not None and session.model:
            return session.model
        if self.default_model is None:
            raise ModelLoadError("no model is loaded yet: press Load model")
        return self.default_model

    def ensure(self, session: Session | None, progress: Progress = silent) -> Lab:
        """The Lab on ``session``'s model, loading it first when another session's job left another
        one in memory (call inside a job: jobs on the model run one at a time)."""
        wanted = self.model_for(session)
        if self.lab is not None and self.lab.loaded.name == wanted:
            return self.lab
        show = self.hosting.display
        held = show(self.lab.loaded.name) if self.lab else "nothing"
        progress(Event("load", 0.0, f"switching the lab from {held} to {show(wanted)} for your job"))
        self.load(
            wanted, silent if self.hosting.public else progress, token=session.token_ok if session else True
        )
        self.swaps += 1
        progress(Event("load", 0.0, f"loaded {show(wanted)} in {self.last_load_s:.1f} s"))
        return self.lab

    def require(self) -> Lab:
        if self.lab is None:
            raise ModelLoadError("no model is loaded yet: press Load model")
        return self.lab

    def _entry(self, session: Session | None) -> ModelFacts:
        name = self.model_for(session)
        if name not in self.known:
            raise StaleSession("your model is not loaded yet: press Load model")
        return self.known[name]

    def shape(self, session: Session | None = None) -> ModelShape:
        """The shape of ``session``'s model (the loaded one's when no session is given)."""
        if session is None and self.lab is not None:
            return self.known[self.lab.loaded.name].shape
        return self._entry(session).shape

    def num_parameters(self, session: Session | None = None) -> int:
        if session is None:
            return self.require().loaded.num_parameters()
        return self._entry(session).parameters

    def tokenizer(self, session: Session | None = None):
        return self._entry(session).tokenizer if session is not None else self.require().loaded.tokenizer

    def info(self, session: Session | None = None) -> dict:
        """``Lab.model_info`` plus per-layer role counts and the memory the model takes (no paths)."""
        if session is None:
            return self.known[self.require().loaded.name].info
        return self._entry(session).info

    def choose(self, session: Session, name: str) -> str:
        """Record a session's model choice (checked against the hosting profile). Its pruned state
        was for its previous model, so it goes; nobody else's work changes."""
        resolved, token_ok = self.hosting.resolve(name)
        switched = resolved != self.model_for(session)
        if switched:
            self.sessions.allow_switch(session)  # refused at once past the host's rate
        if switched or session.masks_model not in (None, resolved):
            session.drop_state()
        session.model, session.token_ok = resolved, token_ok
        return resolved

    # ----- sessions -------------------------------------------------------------------------------
    def check_session(self, session: Session) -> None:
        if session.has_pruned and session.masks_model != self.model_for(session):
            was, now = (
                self.hosting.display(session.masks_model),
                self.hosting.display(self.model_for(session)),
            )
            raise StaleSession(f"your last pruning was for {was}, not {now}. Press 'Prune & evaluate' again.")

    def run(self, session: Session, recipe: Recipe, progress: Progress) -> RunResult:
        """Prune and evaluate for ``session`` and keep its state (1 bit per weight) for its later
        jobs; the model stays in this session's state, so its next job copies nothing."""
        lab = self.ensure(session, progress)
        self.sessions.check_size(mask_bytes(lab, recipe))  # refused before anything is pruned
        gc.collect()  # earlier runs' full states (1 byte a weight) wait in finished jobs' cycles
        result = lab.run(recipe, progress, key=(session.uid, session.runs + 1))
        session.runs += 1
        session.recipe = recipe
        session.output = result.to_dict(lab.model_info())
        session.masks_model = lab.loaded.name
        self.sessions.keep(session, PackedState.pack(result.prune.state))
        return result

    @contextmanager
    def pruned(self, session: Session) -> Iterator[nn.Module]:
        """The model in ``session``'s pruned state for the length of the block (the Lab holds its
        lock); the Lab completes the compact state, whichever method made it. An evicted state is
        pruned again from the session's recipe first (``session.notice`` says so)."""
        self.check_session(session)
        if not session.has_pruned:
            raise StaleSession("nothing pruned in this session yet: press 'Prune & evaluate' first")
        lab = self.ensure(session)
        if session.state is not None:
            state = lab.state if lab.holds(session.state.key) else session.state.unpack()
        elif lab.holds(session.key):  # evicted, but the model is still in it
            state = lab.state
        else:
            state = self._rebuild(session, lab)
        with lab.using(state) as model:
            yield model

    def _rebuild(self, session: Session, lab: Lab) -> PrunedState:
        """An evicted state pruned again from the session's recipe (what ``run`` pruned: the same
        calibration ids and seed, so the same masks; the digest checks it), kept again."""
        start = time.perf_counter()
        gc.collect()  # as in ``run``: earlier full states go before another is made
        try:
            result = lab.prune(session.recipe, key=session.key)
        except (Cancelled, OutOfMemory):
            raise
        except LabError as err:
            raise StaleSession(
                f"{EVICTED} and cannot be rebuilt here ({err}): press 'Prune & evaluate' again"
            ) from None
        packed = PackedState.pack(result.state)
        if packed.digest() != session.evicted:
            lab.restore()
            raise StaleSession(
                f"{EVICTED}, and pruning again from your recipe gave other masks here: "
                "press 'Prune & evaluate' again"
            )
        self.sessions.keep(session, packed)
        session.notice = f"{EVICTED}; rebuilt from your recipe in {time.perf_counter() - start:.1f} s."
        return result.state

    @staticmethod
    def noted(session: Session, text: str) -> str:
        """``text`` after the session's pending notice (its state was rebuilt), said once."""
        notice, session.notice = session.notice, ""
        return f"{notice} {text}" if notice else text

    def note_throughput(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self.tokens_per_s = tokens_per_s

    # ----- heavy jobs: admission, queue, cancel, time limit ----------------------------------------
    def heavy(
        self, session: Session, work: Callable[[Emit], Any], size: JobSize | None = None
    ) -> Iterator[tuple[str, Any]]:
        """``run_job`` for a heavy job of ``session``: checked against the host's limits from ``size``
        (``prune.jobs.job_size``: what it will compute; None only for a job with nothing a visitor
        sizes, a model load or the fixed 2:4 benchmark, which gets the most GPU time) before anything
        else, admitted (one pending per session), queued in turns (``("queue", jobs ahead)`` events
        while waiting, ``("started", None)`` once it has the model), run under the host's time
        limit, cancellable (``Engine.cancel``, a closed page); the queue is free again within a
        moment of a cancel because every long loop checks the token itself
        (``prune.progress.checkpoint``). On ZeroGPU (``self.gpu``) the job runs in a GPU worker that
        asks for the time ``size`` needs."""
        if size is not None:
            self.hosting.limits.check(size)
        gpu_s = self._gpu_seconds(session, size) if self.gpu is not None else 0
        token = self.sessions.admit(session)
        seconds = self.hosting.limits.job_seconds

        def job(emit: Emit) -> Any:
            with cancellable(token):
                ticket = self.jobs.acquire(token, lambda ahead: emit("queue", ahead), session.uid)
                emit("started", None)  # the page stops saying "Waiting"
                try:
                    if seconds:
                        token.deadline = time.monotonic() + seconds
                        token.seconds = seconds
                    if self.gpu is not None:
                        return zerogpu.run(self.gpu, self, session, work, gpu_s, emit)
                    return work(emit)
                finally:
                    # what the job freed in its thread's arena goes back (``ui.host``), before the
                    # next job starts: malloc_trim locks the allocator, which would stall that job
                    trim_heap()
                    self.jobs.release(ticket)

        try:
            for kind, payload in run_job(job, token):
                if kind == "done":
                    # released before the caller's last yield reaches the page, so a visitor's next
                    # request (sent as soon as this result arrives) is not refused as "pending"
                    self.sessions.release(session, token)
                yield kind, payload
        finally:
            self.sessions.release(session, token)

    def _gpu_seconds(self, session: Session, size: JobSize | None) -> int:
        """GPU time for a job of ``session`` (``ui.hosting.gpu_seconds``); raises ``LimitExceeded``."""
        known = self.known.get(self.model_for(session))  # None: a model not loaded yet
        limits, cap = self.hosting.limits, self.hosting.zero_gpu_max_s
        if known is None:
            return gpu_seconds(None, limits, 0, cap=cap)
        return gpu_seconds(size, limits, known.parameters, self.tokens_per_s, cap)


def mask_bytes(lab: Lab, recipe: Recipe) -> int:
    """Bytes the recipe's masks will take packed (1 bit per weight, each row padded to whole bytes),
    so a state larger than the budget is refused before the pruning; a structured state has none."""
    if recipe.structured:
        return 0
    lm = lab.loaded
    shapes = [
        target.shape(lm.model)
        for layer, role, target in lm.roles.items()
        if recipe.sparsity_for(layer, role) > 0
    ]
    return sum(rows * -(-cols // 8) for rows, cols in shapes)
