"""The one model the app serves, each browser session's own pruned state, and background jobs.

Isolation: the model in memory is shared, so every heavy job goes through the ``Lab``, which holds
its lock and puts the model into the state of the session that asked (``lab.run`` for a new run,
``Engine.pruned(session)`` for that session's masks, ``lab.dense()``) before it reads a weight.
Sessions keep their masks bit-packed on the CPU (1 bit per weight).
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evaluation.lab import Lab, RunResult
from prune.apply import Masks
from prune.errors import Cancelled, LabError
from prune.models import OFFLINE_MODELS, ModelLoadError
from prune.progress import Progress, silent
from prune.recipe import Recipe
from ui.recipes import ModelShape

EXPORT_ROOT = Path(tempfile.gettempdir()) / "pruning-lab-exports"  # every session's files, below

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
    model_token: int = -1  # which model load the masks belong to
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
    """The session has no masks for the model that is loaded now."""


class Engine:
    """Holds the one loaded model (a ``Lab``) for every session; swaps it on request."""

    def __init__(self, device: str = "auto", dtype: str = "auto"):
        self.device = device
        self.dtype = dtype
        self.lab: Lab | None = None
        self.token = 0  # bumped by every successful load
        self.offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokens_per_s: float | None = None  # last measured forward throughput (for time estimates)
        self._load_lock = threading.Lock()

    # ----- the model ------------------------------------------------------------------------------
    def load(self, name: str, progress: Progress = silent) -> Lab:
        """Load ``name``; the old model keeps serving until the new one has loaded."""
        name = (name or "").strip()
        if not name:
            raise ModelLoadError("no model given: pick one from the list or type a hub id or local folder")
        with self._load_lock:
            try:
                lab = Lab.open(Recipe(model=name, dtype=self.dtype, device=self.device), progress)
            except ModelLoadError as err:
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
            del old
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self.lab

    def require(self) -> Lab:
        if self.lab is None:
            raise ModelLoadError("no model is loaded yet: press Load model")
        return self.lab

    def shape(self) -> ModelShape:
        lm = self.require().loaded
        return ModelShape(
            name=lm.name,
            roles=lm.roles.roles,
            num_layers=lm.roles.num_layers,
            layer_counts=lm.roles.layer_param_counts(lm.model),
            dtype=self.dtype,
            device=self.device,
        )

    def info(self) -> dict:
        """``Lab.model_info`` plus per-layer role counts and the memory the model takes."""
        lab = self.require()
        lm = lab.loaded
        return {
            **lab.model_info(),
            "layer_role_parameters": lm.roles.layer_param_counts(lm.model),
            "memory": lab.memory(),
        }

    # ----- sessions -------------------------------------------------------------------------------
    def check_session(self, session: Session) -> None:
        if session.masks is not None and session.model_token != self.token:
            name = self.lab.loaded.name if self.lab else "another model"
            raise StaleSession(
                f"the lab now holds {name}: your last pruning was for another model. "
                "Press 'Prune & evaluate' again."
            )

    def run(self, session: Session, recipe: Recipe, progress: Progress) -> RunResult:
        """Prune and evaluate for ``session`` and keep its masks (1 bit per weight) for its later
        jobs; the model stays in this session's state, so its next job copies nothing."""
        lab = self.require()
        result = lab.run(recipe, progress, key=(session.uid, session.runs + 1))
        session.runs += 1
        session.recipe = recipe
        session.masks = PackedMasks.pack(result.prune.masks)
        session.model_token = self.token
        return result

    @contextmanager
    def pruned(self, session: Session) -> Iterator[nn.Module]:
        """The model in ``session``'s pruned state for the length of the block (the Lab holds its lock)."""
        self.check_session(session)
        if session.masks is None:
            raise StaleSession("nothing pruned in this session yet: press 'Prune & evaluate' first")
        lab = self.require()
        key = session.owner()
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


# ----- background jobs ----------------------------------------------------------------------------
Emit = Callable[[str, Any], None]


def run_job(work: Callable[[Emit], Any]) -> Iterator[tuple[str, Any]]:
    """Run ``work(emit)`` in its own thread and yield what it emits, then ``("done", result)``.

    Gradio advances a sync generator from changing worker threads, so a lock held across
    ``yield``s would be released by the wrong thread; the job's thread holds it instead."""
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def emit(kind: str, payload: Any) -> None:
        if cancelled.is_set():
            raise Cancelled("the page that started this job is gone")  # stops the job at its next report
        events.put((kind, payload))

    def target() -> None:
        try:
            events.put(("done", work(emit)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            events.put(("error", err))

    threading.Thread(target=target, daemon=True, name="lab-job").start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            yield kind, payload
            if kind == "done":
                return
    finally:
        cancelled.set()
