"""Each browser session's own pruned state and the book of live sessions: who is alive, which
jobs each one has waiting or running, the byte budget of their kept states, and expiry after the
host's TTL.

A session keeps its ``PrunedState`` compactly (``PackedState``): masks at one bit per weight on the
CPU, the values of a weight-changing method left out; ``Lab.using`` solves those again from the
recipe, so no session holds a second copy of rewritten weights. All kept states together stay
within the host's budget (``--state-budget-mb``): past it the oldest idle session's state is
evicted, leaving its recipe and a digest of its masks, and ``Engine.pruned`` prunes it again from
the recipe when the session comes back (checked against the digest: the same masks, bitwise).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gradio.utils import get_upload_folder

from prune.errors import LabError
from prune.progress import CancelToken
from prune.recipe import Recipe
from prune.state import PrunedState
from prune.structured import Structure
from ui.host import trim_heap
from ui.hosting import Hosting, LimitExceeded, pending_words
from ui.uploads import discard

# Every session's files, below; a fresh folder per server process, removed when it exits. It lies in
# Gradio's upload folder: a file handed to a visitor from there is served as it is, while one from
# anywhere else is first copied into it (a second copy of an exported model, hashed on the way).
_UPLOADS = Path(get_upload_folder())
_UPLOADS.mkdir(parents=True, exist_ok=True)
EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="pruning-lab-exports-", dir=_UPLOADS))
atexit.register(shutil.rmtree, EXPORT_ROOT, True)


@dataclass(frozen=True)
class PackedState:
    """A ``PrunedState`` at 1 bit per weight on the CPU (bool tensors take 8x more), its values
    left out: ``unpack`` gives a compact state that ``Lab.using`` completes."""

    bits: dict[tuple[int, str], tuple[np.ndarray, tuple[int, int]]] = field(default_factory=dict)
    recipe: Recipe | None = None
    key: Hashable | None = None
    structure: Structure | None = None  # structured pruning: the kept units (a few index lists)

    @classmethod
    def pack(cls, state: PrunedState) -> PackedState:
        bits = {key: (np.packbits(m.cpu().numpy(), axis=1), tuple(m.shape)) for key, m in state.masks.items()}
        return cls(bits, state.recipe, state.key, state.structure)

    def unpack(self) -> PrunedState:
        masks = {
            key: torch.from_numpy(np.unpackbits(bits, axis=1, count=shape[1]).astype(bool))
            for key, (bits, shape) in self.bits.items()
        }
        return PrunedState(masks, {}, self.recipe, self.key, self.structure)

    def pruned(self) -> int:
        return sum(
            int(np.unpackbits(bits, axis=1, count=shape[1]).sum()) for bits, shape in self.bits.values()
        )

    def nbytes(self) -> int:
        return sum(bits.nbytes for bits, _ in self.bits.values())

    def digest(self) -> str:
        """What an evicted state leaves of its masks: a rebuilt one must match it bit for bit."""
        h = hashlib.sha256(repr(self.structure).encode())
        for key in sorted(self.bits):
            bits, shape = self.bits[key]
            h.update(repr((key, shape)).encode())
            h.update(np.ascontiguousarray(bits).tobytes())
        return h.hexdigest()


HISTORY_RUNS = 100  # runs a session's history table and plot keep (the oldest go first)


@dataclass
class Session:
    """What one browser tab (or API client) owns: its last recipe, pruned state and run history."""

    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # unique across app restarts too
    recipe: Recipe | None = None  # the last recipe as the visitor set it
    state: PackedState | None = None  # what it pruned to (keyed ``(uid, run)``)
    evicted: str | None = None  # while its state is evicted: the masks' digest (the recipe rebuilds them)
    notice: str = ""  # a line for its next result (its state was rebuilt)
    model: str | None = None  # the model this session chose (None: the host's default)
    masks_model: str | None = None  # the model its state belongs to
    token_ok: bool = True  # whether the host's Hugging Face token may be used for its model
    runs: int = 0
    history: deque[dict] = field(default_factory=lambda: deque(maxlen=HISTORY_RUNS))  # the newest runs
    last: dict | None = None  # the last run's result summary (what the API returns)
    output: dict | None = None  # the last run's result as the CLI prints it (export, push, card)
    studies: dict[str, Any] = field(default_factory=dict)  # study kind -> its last StudyResult
    uploads: set[str] = field(default_factory=set)  # the files it uploaded (deleted when it expires)
    switches: list[float] = field(default_factory=list)  # when it switched models (last minute)

    def __deepcopy__(self, memo: dict) -> Session:
        """Gradio deep-copies the State's initial value for every new browser session: a new Session."""
        return Session()

    def folder(self, what: str) -> Path:
        """Where this session's exports and studies of kind ``what`` go."""
        return EXPORT_ROOT / f"session-{self.uid}" / what

    def note_uploads(self, *paths: str | None) -> None:
        self.uploads.update(str(p) for p in paths if p)

    @property
    def key(self) -> tuple[str, int]:
        """The key of its latest pruned state (``Engine.run`` names each run's state so)."""
        return self.uid, self.runs

    @property
    def has_pruned(self) -> bool:
        """A state kept, or evicted with its recipe left to rebuild it."""
        return self.state is not None or self.evicted is not None

    def evict(self) -> None:
        self.evicted, self.state = self.state.digest(), None

    def drop_state(self) -> None:
        self.state = None
        self.evicted = None
        self.recipe = None
        self.output = None
        self.masks_model = None


class StaleSession(LabError):
    """The session has no pruned state for the model it works on now."""


class StateTooLarge(LimitExceeded):
    """One pruned state larger than the budget for every session's states together."""


def megabytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MB" if count >= 2**17 else f"{count / 2**10:,.1f} KB"


_expired = itertools.count()  # names for the folders of expired sessions, removed after the lock


class SessionBook:
    """The live sessions, the cancel tokens of each one's pending jobs, the budget of their kept
    states (``budget`` bytes, None: no budget) and expiry: a session idle longer than the host's
    TTL (and with no job) is expired by a reaper thread."""

    def __init__(self, hosting: Hosting):
        self.hosting = hosting
        mb = hosting.state_budget_mb
        self.budget: int | None = None if mb is None else int(mb * 2**20)
        self.evictions = 0
        self._sessions: dict[str, Session] = {}
        self._seen: dict[str, float] = {}
        self._running: dict[str, set[CancelToken]] = {}  # session uid -> tokens of its waiting/running jobs
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None

    # ----- kept states within the budget ----------------------------------------------------------
    def kept_bytes(self) -> int:
        """Bytes of every live session's kept state (``PackedState.nbytes``)."""
        with self._lock:
            return self._kept_bytes()

    def _kept_bytes(self) -> int:
        return sum(s.state.nbytes() for s in self._sessions.values() if s.state is not None)

    def check_size(self, nbytes: int) -> None:
        """Refuse a state that alone is larger than the budget (before it is computed, if possible)."""
        if self.budget is not None and nbytes > self.budget:
            raise StateTooLarge(
                f"this pruning's masks take {megabytes(nbytes)} at 1 bit per weight, more than the "
                f"{megabytes(self.budget)} this server keeps for every visitor's pruned model together: "
                "prune fewer module types"
            )

    def keep(self, session: Session, state: PackedState) -> None:
        """``state`` becomes ``session``'s, within the budget: the states of the sessions idle the
        longest are evicted first, never one with a job waiting or running. If that does not make
        room, ``state`` itself is evicted at once (its next job rebuilds it)."""
        self.check_size(state.nbytes())
        with self._lock:
            self._sessions[session.uid] = session
            self._seen.setdefault(session.uid, time.monotonic())
            session.state, session.evicted = state, None
            if self.budget is None:
                return
            idle = [
                s
                for s in self._sessions.values()
                if s is not session and s.state is not None and not self._running.get(s.uid)
            ]
            used = self._kept_bytes()
            for other in sorted(idle, key=lambda s: self._seen.get(s.uid, 0.0)):
                if used <= self.budget:
                    break
                used -= other.state.nbytes()
                other.evict()
                self.evictions += 1
            if used > self.budget:
                session.evict()
                self.evictions += 1

    def touch(self, session: Session) -> None:
        """Note that ``session`` is alive (idle sessions expire after the host's TTL)."""
        with self._lock:
            self._sessions[session.uid] = session
            self._seen[session.uid] = time.monotonic()
        self._start_reaper()

    def admit(self, session: Session) -> CancelToken:
        """A token for one more heavy job of ``session``; refused at once when it has as many
        pending as the host allows (public: one running and one waiting), so one visitor cannot
        fill the line that every other visitor waits in."""
        self.touch(session)
        limit = self.hosting.limits.pending_per_session
        with self._lock:
            tokens = self._running.setdefault(session.uid, set())
            if len(tokens) >= limit:
                raise LimitExceeded(
                    f"you already have {pending_words(limit)}: the most this server allows per "
                    "visitor; wait for one to finish or press Cancel"
                )
            token = CancelToken()
            tokens.add(token)
        return token

    def allow_switch(self, session: Session) -> None:
        """Count a model switch of ``session``; refused when it switched the host's limit of times
        in the last minute (each switch loads a model and empties the previous one's caches, for
        every visitor)."""
        limit = self.hosting.limits.model_switches_per_minute
        if limit is None:
            return
        now = time.monotonic()
        with self._lock:
            recent = [t for t in session.switches if now - t < 60.0]
            if len(recent) >= limit:
                wait = 60.0 - (now - recent[0])
                raise LimitExceeded(
                    f"model switches: {limit} in the last minute, the most this server allows per "
                    f"visitor (every switch reloads the model); try again in {max(1, round(wait))} s"
                )
            session.switches = [*recent, now]

    def release(self, session: Session, token: CancelToken) -> None:
        with self._lock:
            self._running.get(session.uid, set()).discard(token)
            self._seen[session.uid] = time.monotonic()

    def cancel(self, session: Session, reason: str = "cancelled by you") -> int:
        """Cancel every waiting or running job of ``session``; returns how many."""
        with self._lock:
            tokens = list(self._running.get(session.uid, ()))
        for token in tokens:
            token.cancel(reason)
        return len(tokens)

    def expire(self, session: Session) -> None:
        """Free what a session holds: its state, studies, files (exports, uploads no live session
        also named, and their memoized token ids). Called when Gradio deletes its state (tab
        closed) and at unload; ``reap`` expires the idle ones."""
        self.cancel(session, "your session expired")
        with self._lock:
            leftovers = self._forget(session)
        leftovers.remove()

    def _forget(self, session: Session) -> Leftovers:
        """Under the lock: drop the session and what it holds; its folder is renamed at once (a
        job admitted right after starts clean) and, with its uploads, returned for removal
        outside the lock."""
        session.drop_state()
        session.studies.clear()
        self._sessions.pop(session.uid, None)
        self._seen.pop(session.uid, None)
        if not self._running.get(session.uid):
            self._running.pop(session.uid, None)
        shared = set().union(*(s.uploads for s in self._sessions.values()))
        uploads, session.uploads = session.uploads - shared, set()  # Gradio keeps one file per content
        gone = EXPORT_ROOT / f"expired-{os.getpid()}-{next(_expired)}"
        try:
            (EXPORT_ROOT / f"session-{session.uid}").rename(gone)
        except FileNotFoundError:
            gone = None
        return Leftovers(gone, uploads)

    def forget(self, session: Any) -> None:
        """``gr.State(delete_callback=...)``: Gradio dropped this session's state."""
        if isinstance(session, Session):
            self.expire(session)

    def reap(self) -> int:
        """Expire sessions idle longer than the TTL (and with no job); returns how many. Deciding
        and dropping happen under one hold of the lock, so a session touched or admitted meanwhile
        is either not idle or expired before its job is admitted, never while it runs."""
        ttl = self.hosting.session_ttl_s
        now = time.monotonic()
        with self._lock:
            idle = [
                self._sessions[uid]
                for uid, seen in self._seen.items()
                if now - seen > ttl and not self._running.get(uid) and uid in self._sessions
            ]
            leftovers = [self._forget(session) for session in idle]
        for left in leftovers:
            left.remove()
        if idle:
            gc.collect()
            trim_heap()
        return len(idle)

    def live(self) -> int:
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


@dataclass(frozen=True)
class Leftovers:
    """An expired session's files: its renamed folder and the uploads no live session named."""

    folder: Path | None
    uploads: set[str]

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        discard(self.uploads, spare=EXPORT_ROOT)
