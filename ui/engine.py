"""The one model the app serves, each browser session's own pruned state, and background jobs.

Isolation: the model in memory is shared, so every heavy job goes through the ``Lab``, which holds
its lock and puts the model into the state of the session that asked (``lab.run`` for a new run,
``Engine.pruned(session)`` for that session's masks, ``lab.dense()``) before it reads a weight.
Sessions keep their masks bit-packed on the CPU (1 bit per weight).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gradio.utils import get_upload_folder
from torch import nn

from evaluation.lab import Lab, RunResult
from prune.errors import LabError
from prune.progress import CancelToken, Event, Progress, cancellable, silent
from prune.recipe import Recipe
from runtime.apply import Masks
from runtime.models import OFFLINE_MODELS, ModelLoadError
from ui import zerogpu
from ui.hosting import REFUSED_MODEL, Hosting, JobSize, LimitExceeded, ModelRefused, gpu_seconds
from ui.jobs import Emit, run_job
from ui.recipes import ModelShape

# Every session's files, below; a fresh folder per server process, removed when it exits. It lies in
# Gradio's upload folder: a file handed to a visitor from there is served as it is, while one from
# anywhere else is first copied into it (a second copy of an exported model, hashed on the way).
_UPLOADS = Path(get_upload_folder())
_UPLOADS.mkdir(parents=True, exist_ok=True)
EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="pruning-lab-exports-", dir=_UPLOADS))
atexit.register(shutil.rmtree, EXPORT_ROOT, True)

OFFLINE_CHOICES = [
    ("SmolLM2-135M-Instruct (offline)", "smollm2-135m-instruct"),
    ("Gemma-3-270M (offline)", "gemma3-270m"),
]
HUB_MODELS = [
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "microsoft/phi-2",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Meta-Llama-3-8B",
    "mistralai/Mistral-7B-v0.1",
]
MODEL_CHOICES = OFFLINE_CHOICES + [(name, name) for name in HUB_MODELS]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers; offline, hub ids then fail in seconds instead of minutes."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline_if_no_hub() -> bool:
    """Set HF_HUB_OFFLINE when the hub is unreachable (before transformers reads it). True if offline."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


def trim_heap() -> None:
    """Hand freed heap back to the OS: glibc keeps what a thread freed in that thread's arena, and
    every job runs in a thread of its own, so what expired sessions freed would stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


# ----- packed masks -------------------------------------------------------------------------------
@dataclass
class PackedMasks:
    """A session's masks at 1 bit per weight on the CPU (bool tensors take 8x more)."""

    bits: dict[tuple[int, str], tuple[np.ndarray, tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def pack(cls, masks: Masks) -> PackedMasks:
        return cls({key: (np.packbits(m.cpu().numpy(), axis=1), tuple(m.shape)) for key, m in masks.items()})

    def unpack(self) -> Masks:
        return {
            key: torch.from_numpy(np.unpackbits(bits, axis=1, count=shape[1]).astype(bool))
            for key, (bits, shape) in self.bits.items()
        }

    def pruned(self) -> int:
        return sum(
            int(np.unpackbits(bits, axis=1, count=shape[1]).sum()) for bits, shape in self.bits.values()
        )

    def nbytes(self) -> int:
        return sum(bits.nbytes for bits, _ in self.bits.values())


@dataclass
class Session:
    """What one browser tab (or API client) owns: its last recipe, masks and run history."""

    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # unique across app restarts too
    recipe: Recipe | None = None
    masks: PackedMasks | None = None
    model: str | None = None  # the model this session chose (None: the host's default)
    masks_model: str | None = None  # the model its masks belong to
    token_ok: bool = True  # whether the host's Hugging Face token may be used for its model
    runs: int = 0
    history: list[dict] = field(default_factory=list)
    last: dict | None = None  # the last run's result summary (what the API returns)
    studies: dict[str, Any] = field(default_factory=dict)  # study kind -> its last StudyResult

    def __deepcopy__(self, memo: dict) -> Session:
        """Gradio deep-copies the State's initial value for every new browser session: a new Session."""
        return Session()

    def owner(self) -> tuple[str, int]:
        """Names the session's current masks: a new run makes new ones."""
        return (self.uid, self.runs)

    def folder(self, what: str) -> Path:
        """Where this session's exports and studies of kind ``what`` go."""
        return EXPORT_ROOT / f"session-{self.uid}" / what


class StaleSession(LabError):
    """The session has no masks for the model it works on now."""


class JobQueue:
    """First come, first served: one heavy job on the model at a time, the others wait in order.
    A waiting job whose token is cancelled leaves the line; ``max_size`` bounds the line."""

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size
        self._cond = threading.Condition()
        self._line: deque = deque()
        self.holder: object | None = None

    def __len__(self) -> int:
        return len(self._line)

    def acquire(self, token: CancelToken, waiting: Callable[[int], None] = lambda ahead: None) -> object:
        ticket = object()
        reported = -1
        with self._cond:
            if self.max_size is not None and len(self._line) >= self.max_size:
                raise LimitExceeded(
                    f"the lab is busy: {len(self._line)} jobs are waiting, the most this server queues; "
                    "try again in a few minutes"
                )
            self._line.append(ticket)
        try:
            while True:
                with self._cond:
                    ahead = self._line.index(ticket)
                    if ahead == 0 and self.holder is None:
                        self.holder = ticket
                        return ticket
                    token.check()
                    self._cond.wait(0.2)
                    token.check()
                if ahead != reported:
                    reported = ahead
                    waiting(ahead)
        except BaseException:
            self.release(ticket)
            raise

    def release(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            if self.holder is ticket:
                self.holder = None
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self.holder is not None


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
        self._known: dict[
            str, tuple[ModelShape, int, Any, dict]
        ] = {}  # name -> shape, params, tokenizer, info
        self.jobs = JobQueue(self.hosting.limits.queue_size)
        self._sessions: dict[str, Session] = {}
        self._seen: dict[str, float] = {}
        self._running: dict[str, set[CancelToken]] = {}  # session uid -> tokens of its waiting/running jobs
        self._bookkeeping = threading.Lock()
        self.swaps = 0
        self.last_load_s = 0.0
        self._reaper: threading.Thread | None = None
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
            try:
                lab = Lab.open(
                    Recipe(model=name, dtype=self.dtype, device=self.device),
                    progress,
                    token=None if token is None or token else False,
                )
            except ModelLoadError as err:
                if self.hosting.public:
                    raise ModelRefused(
                        f"{REFUSED_MODEL} Choose one of: {', '.join(self.hosting.allowed())}."
                    ) from None
                if self.offline and name not in OFFLINE_MODELS and not Path(name).expanduser().is_dir():
                    raise ModelLoadError(
                        f"{err} This server cannot reach the Hugging Face Hub, so only the offline models "
                        f"({', '.join(OFFLINE_MODELS)}) and local folders load here."
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
            self._remember(lab)
            del old
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self.lab

    def _remember(self, lab: Lab) -> None:
        """What light handlers need about a model without touching it (bounded by the allow-list)."""
        lm = lab.loaded
        shape = ModelShape(
            name=lm.name,
            roles=lm.roles.roles,
            num_layers=lm.roles.num_layers,
            layer_counts=lm.roles.layer_param_counts(lm.model),
            dtype=self.dtype,
            device=self.device,
        )
        info = {
            **lab.model_info(),
            "layer_role_parameters": lm.roles.layer_param_counts(lm.model),
            "memory": lab.memory(),
        }
        info.pop("source", None)  # a server path
        if len(self._known) >= 16 and lm.name not in self._known:
            self._known.pop(next(iter(self._known)))
        self._known[lm.name] = (shape, lm.num_parameters(), lm.tokenizer, info)

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

    def _entry(self, session: Session | None):
        name = self.model_for(session)
        if name not in self._known:
            raise StaleSession("your model is not loaded yet: press Load model")
        return self._known[name]

    def shape(self, session: Session | None = None) -> ModelShape:
        """The shape of ``session``'s model (the loaded one's when no session is given)."""
        if session is None and self.lab is not None:
            return self._known[self.lab.loaded.name][0]
        return self._entry(session)[0]

    def num_parameters(self, session: Session | None = None) -> int:
        return self._entry(session)[1] if session is not None else self.require().loaded.num_parameters()

    def tokenizer(self, session: Session | None = None):
        return self._entry(session)[2] if session is not None else self.require().loaded.tokenizer

    def info(self, session: Session | None = None) -> dict:
        """``Lab.model_info`` plus per-layer role counts and the memory the model takes (no paths)."""
        if session is None:
            return self._known[self.require().loaded.name][3]
        return self._entry(session)[3]

    def choose(self, session: Session, name: str) -> str:
        """Record a session's model choice (checked against the hosting profile). Its masks were
        for its previous model, so they go; nobody else's work changes."""
        resolved, token_ok = self.hosting.resolve(name)
        if resolved != self.model_for(session) or session.masks_model not in (None, resolved):
            session.masks = None
            session.recipe = None
            session.masks_model = None
        session.model, session.token_ok = resolved, token_ok
        return resolved

    # ----- sessions -------------------------------------------------------------------------------
    def check_session(self, session: Session) -> None:
        if session.masks is not None and session.masks_model != self.model_for(session):
            was, now = (
                self.hosting.display(session.masks_model),
                self.hosting.display(self.model_for(session)),
            )
            raise StaleSession(f"your last pruning was for {was}, not {now}. Press 'Prune & evaluate' again.")

    def run(self, session: Session, recipe: Recipe, progress: Progress) -> RunResult:
        """Prune and evaluate for ``session`` and keep its masks (1 bit per weight) for its later
        jobs; the model stays in this session's state, so its next job copies nothing."""
        lab = self.ensure(session, progress)
        result = lab.run(recipe, progress, key=(session.uid, session.runs + 1))
        session.runs += 1
        session.recipe = recipe
        session.masks = PackedMasks.pack(result.prune.masks)
        session.masks_model = lab.loaded.name
        return result

    @contextmanager
    def pruned(self, session: Session) -> Iterator[nn.Module]:
        """The model in ``session``'s pruned state for the length of the block (the Lab holds its lock)."""
        self.check_session(session)
        if session.masks is None:
            raise StaleSession("nothing pruned in this session yet: press 'Prune & evaluate' first")
        lab = self.ensure(session)
        key = session.owner()
        if not lab.holds(key) and session.recipe.method_spec.changes_weights:
            # masks alone do not describe a SparseGPT state: solve it again (cached Hessians: no
            # forward pass) rather than keep every session's rewritten weights in memory
            lab.prune(session.recipe, key=key)
        masks = (
            lab.masks
            if lab.holds(key)
            else {k: m.to(lab.loaded.device) for k, m in session.masks.unpack().items()}
        )
        with lab.using(masks, key=key) as model:
            yield model

    def note_throughput(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self.tokens_per_s = tokens_per_s

    # ----- heavy jobs: admission, queue, cancel, time limit ----------------------------------------
    def touch(self, session: Session) -> None:
        """Note that ``session`` is alive (idle sessions expire after the host's TTL)."""
        with self._bookkeeping:
            self._sessions[session.uid] = session
            self._seen[session.uid] = time.monotonic()
        self._start_reaper()

    def admit(self, session: Session) -> CancelToken:
        """A token for one more heavy job of ``session``; refused at once when it has one pending."""
        self.touch(session)
        limits = self.hosting.limits
        with self._bookkeeping:
            tokens = self._running.setdefault(session.uid, set())
            if len(tokens) >= limits.pending_per_session:
                raise LimitExceeded(
                    "you already have a job waiting or running: wait for it to finish or press Cancel"
                )
            token = CancelToken()
            tokens.add(token)
        return token

    def release(self, session: Session, token: CancelToken) -> None:
        with self._bookkeeping:
            self._running.get(session.uid, set()).discard(token)
            self._seen[session.uid] = time.monotonic()

    def cancel(self, session: Session, reason: str = "cancelled by you") -> int:
        """Cancel every waiting or running job of ``session``; returns how many."""
        with self._bookkeeping:
            tokens = list(self._running.get(session.uid, ()))
        for token in tokens:
            token.cancel(reason)
        return len(tokens)

    def heavy(
        self, session: Session, work: Callable[[Emit], Any], size: JobSize | None = None
    ) -> Iterator[tuple[str, Any]]:
        """``run_job`` for a heavy job of ``session``: admitted (one pending per session), queued first
        come first served (``("queue", jobs ahead)`` events while waiting), run under the host's time
        limit, cancellable (``Engine.cancel``, a closed page); the queue is free again within a
        moment of a cancel because every long loop checks the token. On ZeroGPU (``self.gpu``) the
        job runs in a GPU worker that asks for the time ``size`` needs (``ui.zerogpu``)."""
        gpu_s = self._gpu_seconds(session, size) if self.gpu is not None else 0
        token = self.admit(session)
        seconds = self.hosting.limits.job_seconds

        def job(emit: Emit) -> Any:
            with cancellable(token):
                ticket = self.jobs.acquire(token, lambda ahead: emit("queue", ahead))
                try:
                    if seconds:
                        token.deadline = time.monotonic() + seconds
                        token.seconds = seconds
                    if self.gpu is not None:
                        return zerogpu.run(self.gpu, self, session, work, gpu_s, emit)
                    return work(emit)
                finally:
                    self.jobs.release(ticket)

        try:
            for kind, payload in run_job(job, token):
                if kind == "done":
                    # released before the caller's last yield reaches the page, so a visitor's next
                    # request (sent as soon as this result arrives) is not refused as "pending"
                    self.release(session, token)
                yield kind, payload
        finally:
            self.release(session, token)

    def _gpu_seconds(self, session: Session, size: JobSize | None) -> int:
        """GPU time for a job of ``session`` (``ui.hosting.gpu_seconds``); raises ``LimitExceeded``."""
        known = self._known.get(self.model_for(session))  # None: a model not loaded yet
        limits, cap = self.hosting.limits, self.hosting.zero_gpu_max_s
        if known is None:
            return gpu_seconds(None, limits, 0, cap=cap)
        return gpu_seconds(size, limits, known[1], self.tokens_per_s, cap)

    # ----- expiry ---------------------------------------------------------------------------------
    def expire(self, session: Session) -> None:
        """Free what a session holds: masks, studies, files. Called when it has been idle longer than
        the TTL, when Gradio deletes its state (tab closed) and at unload."""
        self.cancel(session, "your session expired")
        session.masks = None
        session.masks_model = None
        session.recipe = None
        session.studies.clear()
        shutil.rmtree(EXPORT_ROOT / f"session-{session.uid}", ignore_errors=True)
        with self._bookkeeping:
            self._sessions.pop(session.uid, None)
            self._seen.pop(session.uid, None)
            if not self._running.get(session.uid):
                self._running.pop(session.uid, None)

    def forget(self, session: Any) -> None:
        """``gr.State(delete_callback=...)``: Gradio dropped this session's state."""
        if isinstance(session, Session):
            self.expire(session)

    def reap(self) -> int:
        """Expire sessions idle longer than the TTL (and with no job); returns how many."""
        ttl = self.hosting.session_ttl_s
        now = time.monotonic()
        with self._bookkeeping:
            idle = [
                self._sessions[uid]
                for uid, seen in self._seen.items()
                if now - seen > ttl and not self._running.get(uid) and uid in self._sessions
            ]
        for session in idle:
            self.expire(session)
        if idle:
            gc.collect()
            trim_heap()
        return len(idle)

    def live_sessions(self) -> int:
        return len(self._sessions)

    def _start_reaper(self) -> None:
        if self._reaper is not None:
            return
        period = min(60.0, max(0.5, self.hosting.session_ttl_s / 4))

        def loop() -> None:
            while True:
                time.sleep(period)
                try:
                    self.reap()
                except Exception:  # noqa: BLE001 - the reaper must not die
                    pass

        self._reaper = threading.Thread(target=loop, daemon=True, name="session-reaper")
        self._reaper.start()
