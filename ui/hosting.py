"""How the app is hosted: who may choose which model, and how much one request may ask for.

``Hosting`` is the host's profile. Local ``python app.py`` is free: any hub id or folder, no
limits. ``--public`` (on by itself when ``SPACE_ID`` is set, i.e. on a Hugging Face Space) lets
visitors pick only the models the host names (``--models``; the offline aliases by default),
refuses typed ids unless the host allows them (``--allow-custom-models``, and then never with the
host's token), and checks every request against ``Limits`` before anything runs. Pure Python,
no Gradio: the checks are unit-tested and the same text is shown beside the controls.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.share import display, looks_like_path
from evaluation.tasks import estimate_seconds
from prune.errors import LabError
from prune.jobs import JobSize
from runtime.memory import DoesNotFit
from runtime.models import OFFLINE_MODELS

# One message for every model a visitor may not have, exists or not, so nobody can probe the disk.
REFUSED_MODEL = "That model is not available on this server."
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class LimitExceeded(LabError):
    """A request asks for more than the host allows; the message says the limit."""


class ModelRefused(LabError):
    """A model this server does not offer to visitors (or could not load); no names, no paths."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; ``None`` means no limit. Checked before anything runs."""

    calibration_tokens: int | None = None  # nsamples x seqlen
    eval_windows: int | None = None  # per dataset; "0 = whole test set" is refused when set
    eval_seqlen: int | None = None
    task_docs: int | None = None  # per task; "0 = all" is refused when set
    study_points: int | None = None  # grid values x roles (or series)
    new_tokens: int | None = None
    upload_mb: float | None = None  # Gradio max_file_size
    upload_chars: int | None = None  # characters of text decoded from one upload (runtime.files)
    # Gradio queue max_size: requests waiting for a thread. Above one visitor's burst (40 in
    # bench/public_hostile.py): a full queue refuses every visitor's requests, readouts included,
    # while the app refuses the burst itself per visitor (``pending_per_session``), ~20 a second
    queue_size: int | None = None
    # Gradio threads that serve heavy events (one concurrency group; ``ui.common.HEAVY``): the
    # other threads stay free for light ones (readouts, cancel), and the line of jobs for the
    # model (``ui.job_queue.JobQueue``) is never longer than this
    heavy_threads: int | None = None
    pending_per_session: int = 1  # heavy jobs waiting or running per browser session
    job_seconds: float | None = None  # a heavy job is cancelled past this
    model_switches_per_minute: int | None = None  # per session: each switch reloads the model

    @classmethod
    def for_device(cls, device_type: str) -> Limits:
        """Public defaults: a lesson's worth of work per request on a CPU, more on a GPU."""
        if device_type == "cuda":
            return cls(
                calibration_tokens=128 * 2048,
                eval_windows=64,
                eval_seqlen=4096,
                task_docs=1000,
                study_points=120,
                new_tokens=512,
                upload_mb=50,
                upload_chars=16_000_000,
                queue_size=128,
                heavy_threads=8,
                pending_per_session=2,
                job_seconds=1800,
                model_switches_per_minute=4,
            )
        return cls(
            calibration_tokens=32 * 512,
            eval_windows=16,
            eval_seqlen=1024,
            task_docs=100,
            study_points=40,
            new_tokens=256,
            upload_mb=10,
            upload_chars=2_000_000,  # 1.5 WikiText-2 test sets; tokenizing it peaks at ~300 MB
            queue_size=64,
            heavy_threads=4,
            pending_per_session=2,
            job_seconds=600,
            model_switches_per_minute=4,
        )

    @classmethod
    def none(cls) -> Limits:
        return cls(pending_per_session=1_000_000)

    def replace(self, **changes) -> Limits:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    # ----- the check (raises LimitExceeded with the limit in words) -----------------------------
    def check(self, size: JobSize) -> None:
        """Refuse a job (``prune.jobs.job_size``) that asks for more than one of these limits allows;
        the message names the limit. Only what the job will compute is checked: a calibration the
        recipe does not need is free, one an OWL schedule needs is not."""
        if size.calibration_passes:
            limit = self.calibration_tokens
            _at_most("calibration tokens (samples x tokens per sample)", size.calibration_tokens, limit)
        if size.evaluations:
            _whole("the whole test set", size.eval_windows, self.eval_windows, "windows")
            _at_most("evaluation windows", size.eval_windows, self.eval_windows)
            _at_most("tokens per evaluation window", size.eval_seqlen, self.eval_seqlen)
        if size.task_runs:
            _whole("whole task splits", size.task_docs, self.task_docs, "documents per task")
            _at_most("documents per task", size.task_docs, self.task_docs)
        _at_most("study points (grid values x series)", size.points, self.study_points)
        if size.answers:
            _at_most("new tokens", size.new_tokens, self.new_tokens)

    # ----- what the page shows ------------------------------------------------------------------
    def describe(self) -> str:
        """One line for beside the controls."""
        shown = [
            ("calibration_tokens", lambda v: f"calibration ≤ {v:,} tokens"),
            ("eval_windows", lambda v: f"≤ {v} evaluation windows"),
            ("eval_seqlen", lambda v: f"≤ {v:,} tokens per window"),
            ("task_docs", lambda v: f"≤ {v:,} documents per task"),
            ("study_points", lambda v: f"≤ {v} study points"),
            ("new_tokens", lambda v: f"≤ {v} new tokens"),
            ("upload_mb", lambda v: f"uploads ≤ {v:g} MB"),
            ("upload_chars", lambda v: f"≤ {v:,} characters of text per upload"),
            ("job_seconds", lambda v: f"≤ {v / 60:g} min per job"),
            ("model_switches_per_minute", lambda v: f"≤ {v} model switches a minute"),
        ]
        parts = [text(getattr(self, name)) for name, text in shown if getattr(self, name) is not None]
        if self.pending_per_session < 1000:
            parts.append(f"{pending_words(self.pending_per_session)} per visitor")
        return "Limits on this server: " + ", ".join(parts) + "." if parts else ""


def pending_words(limit: int) -> str:
    """``limit`` heavy jobs of one session in words: 'a job running and one waiting'."""
    if limit == 1:
        return "a job waiting or running"
    if limit == 2:
        return "a job running and one waiting"
    return f"{limit} jobs running or waiting"


def does_not_fit(model: str, err: DoesNotFit) -> str:
    """The memory plan's refusal as a visitor reads it: one sentence, the model by its shown name,
    what is missing, and what they can change (the loader's advice names CLI flags)."""
    return (
        f"{model} does not fit in this server's memory: it {err.shortfall}. Choose a smaller model, "
        "or fewer calibration samples and evaluation windows."
    )


def _at_most(what: str, asked: int | None, limit: int | None) -> None:
    if limit is not None and asked is not None and asked > limit:
        raise LimitExceeded(f"{what}: {asked:,} asked, this server allows at most {limit:,}")


def _whole(what: str, asked: int | None, limit: int | None, unit: str) -> None:
    """``asked`` None means "all of it", which a server with a limit refuses."""
    if limit is not None and asked is None:
        raise LimitExceeded(f"{what} is not available here: ask for at most {limit:,} {unit}")


# ZeroGPU: the most GPU time one call asks for. The platform refuses a call that asks for more than
# the visitor's tier allows per call or has left for the day; the tiers' numbers are not published
# as such (docs/hub/spaces-zerogpu.md: 2 min a day unauthenticated, 3.5 min free, 25 min PRO).
ZERO_GPU_MAX_S = 120.0
ZERO_GPU_TOKENS_PER_S = 8e13  # / parameters: forward tokens a second on an H200 slice (see gpu_seconds)


def gpu_seconds(
    size: JobSize | None,
    limits: Limits,
    parameters: int,
    tokens_per_s: float | None = None,
    cap: float = ZERO_GPU_MAX_S,
) -> int:
    """GPU seconds to ask ZeroGPU for: a fresh worker's start (fork, weights to the GPU) plus the
    forward tokens at the measured throughput (else ``ZERO_GPU_TOKENS_PER_S / parameters``, from the
    7B H200 benchmark, 262k calibration tokens in 9.4 s, scaled to a 3/7 slice; at most 100k/s),
    25 ms a new token, twice that for safety. At most ``cap`` and the host's job time limit; an
    unknown size (or a whole test set) asks for that much. Task tokens are
    ``evaluation.tasks.estimate_seconds`` at 1 token/s; a bitsandbytes copy is taken as a second a
    GB of weights. A larger estimate is refused before anything runs."""
    most = min(cap, limits.job_seconds or cap)
    if size is None or size.eval_tokens is None:
        return int(most)
    weight_gb = 2 * parameters / 1e9  # bf16
    speed = tokens_per_s or min(1e5, ZERO_GPU_TOKENS_PER_S / max(parameters, 1))
    tasks = estimate_seconds(size.tasks, size.task_docs, 1.0) * size.task_runs if size.task_runs else 0.0
    forward = 3 * size.calibration_tokens * size.calibration_passes + size.eval_tokens + tasks
    work = forward / speed + 0.025 * size.generated_tokens + weight_gb * size.quantized_copies
    work += 3 * weight_gb if size.saves_model else 0.0
    seconds = int(2 * (10 + weight_gb / 2 + work)) + 1
    if seconds > most:
        raise LimitExceeded(
            f"this job needs about {seconds} s of GPU time; one ZeroGPU call here may take at most "
            f"{most:g} s: ask for fewer tokens, windows, documents or points"
        )
    return seconds


@dataclass
class Hosting:
    """The host's profile (see the module docstring)."""

    public: bool = False
    models: tuple[str, ...] = ()  # what visitors may choose (public); empty: the offline aliases
    allow_custom: bool = False  # public: visitors may type hub ids (loaded without the host's token)
    limits: Limits = field(default_factory=Limits.none)
    session_ttl_s: float = 3600.0  # idle sessions are freed after this
    state_budget_mb: float | None = None  # sessions' kept states; None: the memory plan's (public) or none
    export_free_mb: float = 2048.0  # an export needs this much free disk besides its own size
    zero_gpu_max_s: float = ZERO_GPU_MAX_S  # ZeroGPU: the most GPU time one job asks for

    @classmethod
    def local(cls) -> Hosting:
        return cls()

    @classmethod
    def public_profile(cls, models: list[str] | None, device_type: str, **changes) -> Hosting:
        allowed = tuple(m.strip() for m in (models or []) if m.strip()) or tuple(OFFLINE_MODELS)
        return cls(public=True, models=allowed, limits=Limits.for_device(device_type), **changes)

    def allowed(self) -> tuple[str, ...]:
        """The names visitors see and send: a host's folder by its last part, never its path."""
        return tuple(display(m) for m in self.sources())

    def sources(self) -> tuple[str, ...]:
        return self.models or tuple(OFFLINE_MODELS)

    def resolve(self, name: str) -> tuple[str, bool]:
        """The model to load for a visitor's choice and whether the host's token may be used.
        Raises ``ModelRefused`` (one message, no paths) for anything the profile does not offer."""
        name = (name or "").strip()
        if not self.public:
            if not name:
                raise ModelRefused("no model given: pick one from the list or type a hub id or local folder")
            return expand_user(name), True
        for source in self.sources():
            if name in (source, display(source)) and (name == source or not looks_like_path(name)):
                return expand_user(source), True
        if self.allow_custom and HUB_ID.match(name) and not Path(name).exists():
            return name, False  # a visitor's own hub id: never with the host's token
        raise ModelRefused(f"{REFUSED_MODEL} Choose one of: {', '.join(self.allowed())}.")

    def display(self, name: str | None) -> str:
        """How a model is named to visitors (public: a folder by its last part)."""
        return display(name or "") if self.public else (name or "")


def expand_user(name: str) -> str:
    """``~/models/x`` -> the host's home folder (hub ids are left alone)."""
    return str(Path(name).expanduser()) if name.startswith("~") else name


def zero_gpu() -> bool:
    """ZeroGPU hardware: the platform's flag, read as the ``spaces`` package reads it
    (``spaces/config.py``: "1", "t" or "true"), and that package importable. Other Spaces, a
    dedicated GPU one too, may have ``spaces`` installed without the flag: they are not ZeroGPU."""
    flag = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
    return flag and _has_spaces()


def _has_spaces() -> bool:
    try:
        import spaces  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: not usable
        return False
    return True


def free_disk_mb(folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free / 2**20


class DiskReservations:
    """Disk promised to exports that are writing now, per process: each export reserves what it will
    write before it writes, checked against the free disk less every other reservation (under one
    lock), so two exports cannot both pass the free-disk check and then fill the disk together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reserved_mb = 0.0

    @contextmanager
    def reserve(self, folder: Path, need_mb: float, margin_mb: float) -> Iterator[None]:
        """Hold ``need_mb`` for the block; raises ``LimitExceeded`` when free disk less the other
        reservations is below ``need_mb + margin_mb``."""
        with self._lock:
            free = free_disk_mb(folder) - self.reserved_mb
            if free < need_mb + margin_mb:
                raise LimitExceeded(
                    f"not enough free disk on the server for an export right now ({max(free, 0):,.0f} MB "
                    f"free, {need_mb + margin_mb:,.0f} MB needed); try again later"
                )
            self.reserved_mb += need_mb
        try:
            yield
        finally:
            with self._lock:
                self.reserved_mb -= need_mb


DISK = DiskReservations()  # one per process: every engine's exports write to the same disk
