"""The hostile phase of ``bench/bench_public.py`` (issue 19): visitors who try to take memory, time or
information from the others, on loopback, bounded in count and time (about 4 min on 2 CPU cores).

    python bench/bench_public.py --phase hostile --data-dir ../shared/data

One ``app.py --public`` on 127.0.0.1 whose model folder (a copy of the converted SmolLM2 made of
links), cache folder and data folder (a folder of links to the data folder's parts, so that the
app's ``--data-dir``, which resolves links, keeps the name) all lie under a folder named after a
random sentinel. Every byte any visitor gets back (outputs, intermediate outputs, messages, logs,
downloaded files, zips unzipped, plots) is kept and searched for the sentinel at the end. The
checks, in the order they run (each one function, each line PASS or FAIL against its target):

- limits: magnitude + OWL over the calibration limit, every study kind over the window limit:
  refused in < 1 s with a message naming the limit;
- the issue's three observations: Wanda + OWL and magnitude + OWL with 4000 x 2048 calibration
  tokens and a downstream study with 200 x 8192 windows refused in < 1 s; a downstream study inside
  the limits cancelled during its dense evaluation, the lab free again within 2 s;
- a calibration ``FileData`` naming a URL (a loopback server run here): refused, never fetched;
- one visitor submits 40 jobs at once (after a warm-up job of the same size): all but two refused
  with a message, while another visitor's readout p95 stays < 1 s and its own job starts behind
  A's running job only (before A's waiting one, within the time A's running job takes);
- 60 sessions prune and stay idle under ``--state-budget-mb 64``: resident memory grows less than
  the budget + 100 MB, and the first (evicted) session's next measure is rebuilt, same perplexity;
- a 1 MB parquet that inflates far past any text limit: refused, resident memory rises < 100 MB;
- no sentinel in anything a visitor got (pages, /config, every answer above and the downloads of
  a sentinel tour: prune with uploads, measure, generate, speed, tasks, a study zip, allocation,
  recipe and model exports).
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "public_hostile.txt"
MODEL_ALIAS = "smollm2-135m-instruct"
LIMITS = dict(calibration=16_384, windows=16, seqlen=1024)  # the CPU defaults, passed explicitly
STATE_BUDGET_MB = 64
SESSIONS = 60
SESSIONS_BUDGET_S = 240.0  # stop opening sessions after this (the line says how many ran)
BURST = 40
ADMITTED = 2  # one running and one waiting job per session
KILL_AT_MB = 2048  # the parquet check kills the server when it has grown this much
REFUSE_WAIT_S = 5.0  # a request not answered by then was accepted: it is cancelled
QUIET = dict(calibration_file=None, eval_file=None, nsamples=4, seqlen=128, eval_datasets=[])
MEASURED = dict(QUIET, eval_datasets=["wikitext2"], eval_windows=2, eval_seqlen=128)
STUDY = dict(
    grid="50", roles=["q"], windows=1, eval_seqlen=128, dataset="wikitext2", tasks=[], limit=4,
    calibration="c4", calibration_file=None, nsamples=4, seqlen=128, seed=0,
)  # fmt: skip


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Check:
    """One line of the result: what was measured and whether it met its target."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class Reply:
    """What one call got back: its value or the app's refusal (``error``, its message), and how long
    it took. ``timed_out``: no answer within the wait, so the job was accepted and may still run;
    ``failure``: anything else that went wrong (the client, the connection)."""

    job: Any
    seconds: float
    value: Any = None
    error: str | None = None
    failure: str | None = None
    timed_out: bool = False
    said: str = ""  # every text it got: values, intermediate outputs, the message, logs

    @property
    def ok(self) -> bool:
        return self.error is None and self.failure is None and not self.timed_out

    def outcome(self) -> str:
        if self.timed_out:
            return "accepted (no answer yet)"
        if self.failure:
            return f"failed: {self.failure[:100]}"
        if self.error is None:
            return f"accepted and finished in {self.seconds:.1f} s"
        return f"refused in {self.seconds:.2f} s ({self.error[:110]!r})"


# ----- everything a visitor got ---------------------------------------------------------------------
@dataclass
class Received:
    """Every byte the server sent any visitor: texts (values as the server sent them, messages, logs,
    pages) and every file an answer points to on the app (plots, recipes, zips), fetched here once,
    kept for the sentinel search. The clients do not download files themselves: gradio_client takes
    any dict with a "path" for a file, and the app's results carry such dicts."""

    app_url: str
    downloads: Path
    texts: list[tuple[str, bytes]] = field(default_factory=list)
    files: list[tuple[str, Path]] = field(default_factory=list)
    fetched: dict[str, Path] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, source: str, value: Any) -> None:
        if isinstance(value, (bytes, str)):
            raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
            with self.lock:
                self.texts.append((source, raw))
        elif isinstance(value, dict):
            url = value.get("url")
            if isinstance(url, str) and url.startswith(self.app_url):
                self.fetch(source, url)
            for key, item in value.items():
                self.add(source, str(key))
                self.add(source, item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.add(source, item)
        elif value is not None:
            self.add(source, repr(value))

    def fetch(self, source: str, url: str) -> None:
        """Download a file the app served (once per URL) into ``downloads``."""
        with self.lock:
            if url in self.fetched:
                return
            path = self.downloads / str(len(self.fetched)) / Path(url.rsplit("/", 1)[-1]).name
            self.fetched[url] = path
        path.parent.mkdir(parents=True)
        try:
            with urllib.request.urlopen(url, timeout=300) as response, path.open("wb") as out:
                shutil.copyfileobj(response, out, 1 << 22)
        except OSError as err:
            self.add(f"{source} (download failed)", f"{type(err).__name__}: {err}")
            return
        with self.lock:
            self.files.append((source, path))

    def hits(self, needle: str) -> tuple[int, list[str]]:
        """How often ``needle`` occurs in everything received, and where (the first few sources, each
        source's first text hit with its context)."""
        raw = needle.encode()
        count, where, seen = 0, [], set()
        for source, text in self.texts:
            if n := text.count(raw):
                count += n
                if source not in seen:
                    seen.add(source)
                    at = text.find(raw)
                    context = text[max(0, at - 70) : at + len(raw) + 30].decode(errors="replace")
                    where.append(f"{source} ...{context!r}")
        for source, path in self.files:
            n, parts = file_hits(path, raw)
            if n:
                count, where = count + n, where + [f"{source}: {path.name} {parts}"]
        return count, where[:8]

    def volume(self) -> str:
        logs = sum(source.endswith("(log)") for source, _ in self.texts)
        size = sum(p.stat().st_size for _, p in self.files) / 2**20
        return f"{len(self.texts)} texts ({logs} logs) and {len(self.files)} files ({size:.0f} MB)"


def stream_hits(stream, needle: bytes, chunk: int = 1 << 22) -> int:
    """Occurrences of ``needle`` in a binary stream read in chunks (a model zip is 0.5 GB)."""
    count, tail = 0, b""
    while block := stream.read(chunk):
        window = tail + block
        count += window.count(needle)
        tail = window[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return count


def file_hits(path: Path, needle: bytes) -> tuple[int, list[str]]:
    """Occurrences in a file's bytes and, for a zip, in every member unpacked (its names too)."""
    with path.open("rb") as f:
        count = stream_hits(f, needle)
    parts = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    n = stream_hits(f, needle) + member.encode().count(needle)
                if n:
                    count += n
                    parts.append(member)
    return count, parts


# ----- a visitor ------------------------------------------------------------------------------------
class Visitor:
    """One session (its own ``gradio_client.Client``); everything it gets goes to ``received``."""

    def __init__(self, url: str, received: Received, name: str):
        from gradio_client import Client

        self.name = name
        self.received = received
        self.client = Client(url, verbose=False, download_files=False)

    def submit(self, api: str, **inputs):
        return self.client.submit(api_name=api, **inputs)

    def wait(self, job, timeout: float, started: float | None = None, what: str = "") -> Reply:
        """The job's answer within ``timeout`` s (a refusal is an answer; no answer: ``timed_out``)."""
        from gradio_client.exceptions import AppError

        started = time.monotonic() if started is None else started
        reply = Reply(job, 0.0)
        try:
            reply.value = job.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            reply.timed_out = True
        except AppError as err:
            reply.error = str(err) or "(an empty message)"
        except Exception as err:  # noqa: BLE001 - the client or the connection: not the app's answer
            reply.failure = f"{type(err).__name__}: {err}"
        reply.seconds = time.monotonic() - started
        if not reply.timed_out:
            self.keep(job, f"{self.name} {what}".strip(), reply)
        return reply

    def call(self, api: str, timeout: float = 120.0, **inputs) -> Reply:
        started = time.monotonic()
        return self.wait(self.submit(api, **inputs), timeout, started, api)

    def keep(self, job, source: str, reply: Reply) -> None:
        """Outputs (every intermediate one too), the error message and the logs (gr.Info/Warning) of
        a finished job. The logs are read from gradio_client 2.x's queue of status updates."""
        logs = []
        updates = getattr(getattr(job, "communicator", None), "updates", None)
        while updates is not None and not updates.empty():
            log = getattr(updates.get_nowait(), "log", None)
            if log:
                logs.append(log[0])
        got = [reply.value, reply.error, reply.failure, job.outputs()]
        self.received.add(source, got)
        self.received.add(f"{source} (log)", logs)
        reply.said = "\n".join(texts_of([got, logs]))

    def cancel(self, job, timeout: float = 60.0) -> float:
        """Send /cancel and return the seconds until ``job`` has ended (inf: not within ``timeout``)."""
        started = time.monotonic()
        self.call("/cancel", timeout=30)
        end = self.wait(job, timeout, what="cancelled job")
        return float("inf") if end.timed_out else time.monotonic() - started


def texts_of(value: Any) -> list[str]:
    """Every string in a JSON-like value (dict keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in texts_of(k) + texts_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in texts_of(v)]
    return []


def has_started(job) -> bool:
    """Whether a queued heavy job runs: a progress report, or an output past "Waiting ..."."""
    if job.status().code.name == "PROGRESS":
        return True
    for out in job.outputs():
        first = out[0] if isinstance(out, (list, tuple)) and out else out
        if isinstance(first, str) and first and not first.startswith("Waiting"):
            return True
    return False


class JobClock(threading.Thread):
    """Notes when each watched job starts running and when it ends, every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.jobs: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.submitted: dict[str, float] = {}
        self.stopped = threading.Event()

    def watch(self, key: str, job) -> None:
        self.submitted[key] = time.monotonic()
        self.jobs[key] = job

    def run(self) -> None:
        while not self.stopped.is_set():
            for key, job in list(self.jobs.items()):
                now = time.monotonic()
                if key not in self.started and has_started(job):
                    self.started[key] = now
                if key not in self.ended and job.done():
                    self.ended[key] = now
            time.sleep(0.05)


class PeakRss(threading.Thread):
    """The highest resident memory of a process while the block runs (sampled every 50 ms); past
    ``kill_at`` MB the process is killed, so that an upload that inflates cannot take this shared
    machine's memory."""

    def __init__(self, pid: int, kill_at: float = float("inf")):
        super().__init__(daemon=True)
        self.pid, self.kill_at, self.killed = pid, kill_at, False
        self.peak, self.stopped = rss_mb(pid), threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and not self.killed:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:  # the process is gone
                return
            if self.peak > self.kill_at:
                os.kill(self.pid, signal.SIGKILL)
                self.killed = True
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join()


# ----- the server: sentinel folders ----------------------------------------------------------------
@dataclass
class Setup:
    """The sentinel folders the app is started with, and what it was started with."""

    root: Path
    sentinel: str
    model: Path
    cache: Path
    data: Path
    real_data: Path  # where the data folder's links lead
    budget_flag: bool  # whether this app has --state-budget-mb (before the merge it may not)


def sentinel_folders(data_dir: Path) -> Setup:
    """<tmp>/<sentinel>-models/smollm2-local (links to the converted model's files), the cache
    folder <sentinel>-cache (linking the real converted models, as the tests' servers do) and the
    data folder <sentinel>-data (links to the data folder's parts)."""
    from app_server import REAL_CACHE, app_env

    sentinel = f"zsentinel{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    model = root / f"{sentinel}-models" / "smollm2-local"
    model.mkdir(parents=True)
    for item in (REAL_CACHE / "models" / MODEL_ALIAS).iterdir():
        (model / item.name).symlink_to(item)
    holder = root / f"{sentinel}-cache-holder"
    app_env(holder)  # holder/cache with the real models linked in
    cache = root / f"{sentinel}-cache"
    (holder / "cache").rename(cache)
    data = root / f"{sentinel}-data"
    data.mkdir()
    for item in data_dir.resolve().iterdir():
        (data / item.name).symlink_to(item)
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    return Setup(root, sentinel, model, cache, data, data_dir.resolve(), "--state-budget-mb" in help_text)


def start_server(setup: Setup):
    """``app.py --public`` on the sentinel folders, explicit CPU limits, a long session TTL."""
    from app_server import start

    os.environ["PRUNING_LAB_DATA"] = str(setup.data)  # app_server passes it as --data-dir
    os.environ["HF_DATASETS_CACHE"] = str(setup.cache / "datasets")  # an upload's arrow files: here
    flags = ["--public", "--model", str(setup.model), "--models", str(setup.model)]
    flags += ["--cache-dir", str(setup.cache), "--session-ttl", "120"]
    flags += ["--max-calibration-tokens", str(LIMITS["calibration"])]
    flags += ["--max-eval-windows", str(LIMITS["windows"]), "--max-eval-seqlen", str(LIMITS["seqlen"])]
    if setup.budget_flag:
        flags += ["--state-budget-mb", str(STATE_BUDGET_MB)]
    return start(flags)


# ----- checks: refusals -----------------------------------------------------------------------------
def names_limit(message: str, limits: list[int]) -> bool:
    """Whether ``message`` names one of ``limits`` as a whole number, with or without thousands
    commas (16 is not the start of 16,384)."""
    forms = {re.escape(form) for n in limits for form in (f"{n:,}", str(n))}
    return any(re.search(rf"(?<!\d)(?<!\d[,.]){form}(?![\d]|[,.]\d)", message) for form in forms)


def refused_fast(url: str, received: Received, name: str, api: str, limits: list[int], **inputs) -> Check:
    """A fresh visitor sends one request over a limit: it must be refused within 1 s with a message
    naming the limit. An accepted request is cancelled (and how long that took is said)."""
    visitor = Visitor(url, received, f"refusal [{name}]")
    reply = visitor.call(api, timeout=REFUSE_WAIT_S, **inputs)
    if reply.timed_out:
        free = visitor.cancel(reply.job)
        detail = f"accepted (no answer in {REFUSE_WAIT_S:g} s); lab free {free:.1f} s after cancel"
        return Check(name, False, detail)
    if reply.error is None:
        return Check(name, False, f"{reply.outcome()} (target: refused)")
    named = names_limit(reply.error, limits)
    passed = reply.seconds < 1.0 and named
    return Check(
        name,
        passed,
        f"refused in {reply.seconds:.2f} s (target < 1 s), message names the limit: "
        f"{'yes' if named else 'no'} ({reply.error[:110]!r})",
    )


def check_limits(url: str, received: Received) -> list[Check]:
    """Done-when 2: magnitude + OWL over the calibration limit; each study kind over the windows."""
    cal, win = LIMITS["calibration"], LIMITS["windows"]
    over = dict(nsamples=64, seqlen=512)  # 32,768 tokens
    checks = [
        refused_fast(url, received, "magnitude + OWL, 64 x 512 calibration", "/prune", [cal],
                     **dict(QUIET, method="magnitude", layer_schedule="owl", **over)),
    ]  # fmt: skip
    for kind, extra in (("single", {}), ("combined", {}), ("downstream", dict(grid="10", tasks=["boolq"]))):
        inputs = {**STUDY, "kind": kind, "windows": 200, **extra}
        checks.append(refused_fast(url, received, f"{kind} study, 200 windows", "/study", [win], **inputs))
    return checks


def check_observations(url: str, received: Received) -> list[Check]:
    """The issue's three observations, repeated; and a study inside the limits cancelled while it
    computes its dense perplexity."""
    cal, win, seq = LIMITS["calibration"], LIMITS["windows"], LIMITS["seqlen"]
    huge = dict(QUIET, nsamples=4000, seqlen=2048, layer_schedule="owl")
    study = dict(STUDY, kind="downstream", grid="10", tasks=["boolq"], windows=200, eval_seqlen=8192)
    return [
        refused_fast(
            url, received, "Wanda + OWL, 4000 x 2048 calibration", "/prune", [cal], **huge, method="wanda"
        ),
        refused_fast(
            url,
            received,
            "magnitude + OWL, 4000 x 2048 calibration",
            "/prune",
            [cal],
            **huge,
            method="magnitude",
        ),
        refused_fast(url, received, "downstream study, 200 windows x 8192", "/study", [win, seq], **study),
        cancel_study_in_dense_evaluation(url, received),
    ]


def cancel_study_in_dense_evaluation(url: str, received: Received) -> Check:
    """A downstream study inside the limits (16 x 1024 windows, BoolQ), cancelled 1.5 s after its
    first point's label arrives: the point's dense perplexity runs then (``Lab.measure`` computes it
    first, reporting nothing). The job must end, the lab free, within 2 s of the cancel."""
    name = "downstream study inside the limits, cancelled in its dense evaluation"
    visitor = Visitor(url, received, "cancel study")
    inputs = dict(STUDY, kind="downstream", grid="10", tasks=["boolq"], windows=16, eval_seqlen=1024, limit=8)
    job = visitor.submit("/study", **inputs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not job.done() and not job.status().progress_data:
        time.sleep(0.05)
    if job.done():
        reply = visitor.wait(job, 1, what="/study")
        return Check(name, False, f"ended before it could be cancelled: {reply.outcome()}")
    time.sleep(1.5)
    progress = job.status().progress_data or []
    doing = progress[-1].desc if progress and progress[-1].desc else "(no progress text)"
    free = visitor.cancel(job)
    detail = f"lab free {free:.2f} s after the cancel (target < 2 s); it was at {doing!r}"
    return Check(name, free < 2.0, detail)


def check_url_upload(url: str, received: Received) -> Check:
    """A calibration FileData naming a URL on a loopback server run here: refused, never fetched."""
    from gradio_client import handle_file

    requests: list[str] = []

    class Counting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            requests.append(self.path)
            body = b"calibration text " * 4096
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{server.server_address[1]}/calibration.txt"
    visitor = Visitor(url, received, "url upload")
    inputs = dict(QUIET, method="wanda", calibration="uploaded file", calibration_file=handle_file(target))
    reply = visitor.call("/prune", timeout=60, **inputs)
    if reply.timed_out:
        visitor.cancel(reply.job)
    server.shutdown()
    passed = reply.error is not None and not requests
    detail = f"{reply.outcome()}; requests the URL's server got: {len(requests)} (target 0)"
    return Check("calibration FileData naming a URL", passed, detail)


# ----- checks: the queue ----------------------------------------------------------------------------
def burst_job(k: int) -> dict:
    """A short heavy job: magnitude masks at a sparsity of its own and 4 x 256 perplexity windows."""
    s = 20 + k
    return dict(MEASURED, method="magnitude", eval_windows=4, eval_seqlen=256,
                q=s, k=s, v=s, o=s, gate=s, up=s, down=s)  # fmt: skip


def check_burst(url: str, received: Received, timeout: float = 240.0) -> list[Check]:
    """Visitor A submits 40 jobs at once; visitor B reads out all the while and submits its own job
    once one of A's runs. A: all but two refused with a message; B: readout p95 < 1 s, and its job
    starts behind A's running job only: before A's waiting one, and within the time A's running job
    takes (both seen from the client the same way). A warm-up job first computes what every later
    job of this size reuses (the dense perplexity, the evaluation windows), so that A's jobs are
    alike and one of them is one job's time."""
    warm = Visitor(url, received, "burst warm-up").call("/prune", timeout=timeout, **burst_job(BURST + 1))
    a = Visitor(url, received, "burst A")
    b = Visitor(url, received, "burst B")
    clock = JobClock()
    clock.start()
    for k in range(BURST):
        clock.watch(f"a{k}", a.submit("/prune", **burst_job(k)))
    latencies: list[float] = []
    ahead: list[str] = []  # A's job that was running when B's was sent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "b" not in clock.jobs and any(key.startswith("a") for key in clock.started):
            ahead = [key for key in clock.started if key.startswith("a")]
            clock.watch("b", b.submit("/prune", **burst_job(BURST)))
        if "b" in clock.ended and len(clock.ended) == BURST + 1:
            break
        latencies.append(b.call("/readout", timeout=30, calibration_file=None, eval_file=None).seconds)
        time.sleep(0.1)
    clock.stopped.set()
    if not all(job.done() for job in clock.jobs.values()):
        a.call("/cancel", timeout=30)
        b.call("/cancel", timeout=30)
    replies = {
        key: (b if key == "b" else a).wait(job, 1 if job.done() else 0.01, what="/prune")
        for key, job in clock.jobs.items()
    }
    a_replies = [r for key, r in replies.items() if key != "b"]
    ran = [r for r in a_replies if r.ok]
    refused = [r for r in a_replies if r.error is not None]
    other = sorted({r.outcome()[:90] for r in a_replies if not r.ok and r.error is None})
    messages = sorted({r.error[:90] for r in refused})
    runs = {k: clock.ended[k] - clock.started[k] for k in replies if k != "b" and k in clock.started}
    checks = [
        Check(
            f"one visitor's burst of {BURST} jobs",
            len(ran) == ADMITTED and len(refused) == BURST - ADMITTED and all(m.strip() for m in messages),
            f"{len(ran)} ran, {len(refused)} refused with a message, {BURST - len(ran) - len(refused)} "
            f"otherwise (target {ADMITTED} ran, {BURST - ADMITTED} refused); messages: {messages[:3]}"
            + (f"; otherwise: {other}" if other else ""),
        ),
        readout_check(latencies),
    ]
    name = "the other visitor's job during the burst"
    b_reply = replies.get("b")
    if b_reply is None or "b" not in clock.started:
        why = "never submitted" if b_reply is None else f"never started: {b_reply.outcome()}"
        checks.append(Check(name, False, f"{why}; warm-up {warm.outcome()}"))
        return checks
    if len(ahead) != 1 or ahead[0] not in runs:
        checks.append(Check(name, False, f"A's jobs seen running when it was sent: {ahead} (one expected)"))
        return checks
    waited = clock.started["b"] - clock.submitted["b"]
    behind = runs[ahead[0]]
    later = [k for k in runs if k != ahead[0]]  # A's jobs that started after B's was sent
    before_later = all(clock.started["b"] < clock.started[k] for k in later)
    took = ", ".join(f"{r:.1f}" for r in runs.values())
    checks.append(
        Check(
            name,
            b_reply.ok and waited <= behind and before_later,
            f"started {waited:.1f} s after it was sent, behind A's running job, which took {behind:.1f} s "
            f"({waited / behind:.2f} of it; target <= 1); started before A's waiting job: "
            f"{'yes' if before_later else 'no'}; A's jobs took {took} s (warm-up {warm.seconds:.1f} s); "
            f"{'finished' if b_reply.ok else b_reply.outcome()}",
        )
    )
    return checks


def readout_check(latencies: list[float]) -> Check:
    name = "another visitor's readout during the burst"
    if not latencies:
        return Check(name, False, "no samples")
    ordered = sorted(latencies)
    p95 = ordered[max(0, int(0.95 * len(ordered)) - 1)]
    return Check(
        name,
        p95 < 1.0,
        f"p50 {1000 * statistics.median(ordered):.0f} ms, p95 {1000 * p95:.0f} ms, max "
        f"{1000 * ordered[-1]:.0f} ms over {len(ordered)} calls (target p95 < 1 s)",
    )


# ----- checks: memory -------------------------------------------------------------------------------
def check_sessions(url: str, received: Received, pid: int, budget_flag: bool) -> list[Check]:
    """60 sessions prune (Wanda from cached statistics and magnitude, alternating, each at its own
    sparsity) and stay idle. Resident memory after vs before: less than the state budget + 100 MB;
    the first session (the oldest state, evicted first) measures again: rebuilt, same perplexity."""
    first = Visitor(url, received, "session 0")
    pruned = first.call("/prune", timeout=300, **dict(MEASURED, method="wanda", stats_mode="cached"))
    before_measure = first.call("/measure", timeout=120)
    if not (pruned.ok and before_measure.ok):
        why = f"prune {pruned.outcome()}, measure {before_measure.outcome()}"
        return [Check(f"{SESSIONS} idle sessions under the state budget", False, f"session 0 failed: {why}")]
    time.sleep(1.0)
    before = rss_mb(pid)
    visitors, curve, failed = [first], [], 0
    started = time.monotonic()
    for k in range(1, SESSIONS):
        if time.monotonic() - started > SESSIONS_BUDGET_S:
            break
        visitor = Visitor(url, received, f"session {k}")
        s = 10 + k % 60
        method = "wanda" if k % 2 else "magnitude"
        roles = dict(q=s, k=s, v=s, o=s, gate=s, up=s, down=s)
        failed += not visitor.call("/prune", timeout=120, **dict(QUIET, method=method, **roles)).ok
        visitors.append(visitor)  # kept: a dropped client stops its heartbeat and Gradio frees its state
        if k % 10 == 9:
            curve.append(rss_mb(pid))
    time.sleep(2.0)
    after = rss_mb(pid)
    again = first.call("/measure", timeout=300)
    rebuilt = "rebuilt" in again.said.lower()
    same = again.ok and same_perplexity(again.value[1], before_measure.value[1])
    budget = "" if budget_flag else " (this app has no --state-budget-mb: started without it)"
    return [
        Check(
            f"{len(visitors)} idle sessions under a {STATE_BUDGET_MB} MB state budget",
            budget_flag
            and len(visitors) == SESSIONS
            and not failed
            and after - before < 100 + STATE_BUDGET_MB,
            f"resident memory {before:.0f} MB -> {after:.0f} MB ({after - before:+.0f} MB; target < "
            f"{STATE_BUDGET_MB + 100}); after every 10: {', '.join(f'{m:.0f}' for m in curve)} MB; "
            f"{failed} prunes failed; {time.monotonic() - started:.0f} s{budget}",
        ),
        Check(
            "the first (evicted) session measures again",
            same and rebuilt,
            f"{again.outcome()}; 'rebuilt' said: {'yes' if rebuilt else 'no'}; "
            f"perplexity before {before_measure.value[1]} vs after {again.value[1] if again.ok else '-'} "
            f"(target equal)",
        ),
    ]


def same_perplexity(a: dict, b: dict) -> bool:
    """The same datasets, each perplexity equal to 1e-6 relative (the same masks on the same windows)."""
    return bool(a) and a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) for k in a)


def inflating_parquet(folder: Path, inflate_mb: int) -> Path:
    """About 1 MB of parquet whose "text" column decodes to ``inflate_mb`` MB: rows of one repeated
    sentence (zstd makes each a few hundred bytes) and 1 MB of random hex in a second column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "notes.parquet"
    sentence = "The quick brown fox jumps over the lazy dog while the lab keeps running. "
    row = (sentence * (2**20 // len(sentence) + 1))[: 2**20]
    pad = random.Random(0).randbytes(2**20).hex()  # 2 MB of hex: about 1 MB compressed
    schema = pa.schema([("text", pa.large_string()), ("pad", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False) as writer:
        for first in range(0, inflate_mb, 16):
            n = min(16, inflate_mb - first)
            pads = [pad if first == 0 and i == 0 else "" for i in range(n)]
            texts = [f"{first + i} {row}" for i in range(n)]
            writer.write_table(pa.table({"text": texts, "pad": pads}, schema))
    return path


def check_parquet(url: str, received: Received, pid: int, folder: Path, inflate_mb: int) -> Check:
    """A small parquet as calibration text whose text inflates to ``inflate_mb`` MB: refused, and the
    server's resident memory rises less than 100 MB meanwhile (its peak, sampled every 50 ms)."""
    from gradio_client import handle_file

    path = inflating_parquet(folder, inflate_mb)
    visitor = Visitor(url, received, "parquet")
    inputs = dict(QUIET, method="wanda", calibration="uploaded file", calibration_file=handle_file(str(path)))
    before = rss_mb(pid)
    with PeakRss(pid, kill_at=before + KILL_AT_MB) as peak:
        reply = visitor.call("/prune", timeout=90, **inputs)
        if reply.timed_out:
            visitor.cancel(reply.job, timeout=120)
    rise = peak.peak - before
    killed = f"; the server was killed at +{KILL_AT_MB} MB to spare the machine" if peak.killed else ""
    return Check(
        f"a {path.stat().st_size / 2**20:.1f} MB parquet inflating to {inflate_mb} MB of text",
        reply.error is not None and rise < 100,
        f"{reply.outcome()}; resident memory peak {rise:+.0f} MB (target < 100){killed}",
    )


# ----- checks: server paths -------------------------------------------------------------------------
def sentinel_tour(url: str, received: Received, folder: Path) -> Check:
    """One visitor gets everything it can, for the sentinel search: the pages, a prune with uploaded
    calibration and evaluation text, measure, generate, speed, 2:4 timing, tasks, a study (its zip),
    allocation, a refused model (the one refusal expected), the recipe and the model exports."""
    from gradio_client import handle_file

    for page in ("", "config", "gradio_api/info"):
        with urllib.request.urlopen(url + page, timeout=30) as response:
            received.add(f"page /{page}", response.read())
    words = "pruning sparsity weight layer attention model token calibration window study export".split()
    text = " ".join(random.Random(1).choice(words) for _ in range(20_000))
    (folder / "my-notes.txt").write_text(text)
    upload = handle_file(str(folder / "my-notes.txt"))
    p = Visitor(url, received, "tour")
    prune = dict(MEASURED, method="wanda", calibration="uploaded file", calibration_file=upload,
                 eval_file=upload, eval_datasets=["wikitext2", "c4", "uploaded file"])  # fmt: skip
    calls: list[tuple[str, dict]] = [
        ("/prune", prune),
        ("/readout", dict(calibration_file=None, eval_file=None)),
        ("/measure", {}),
        ("/generate", dict(prompt="Name a colour.", max_new_tokens=8)),
        ("/speed", {}),
        ("/measure_24", {}),
        ("/tasks", dict(tasks=["boolq"], limit=4, dense=True)),
        ("/study", dict(STUDY, kind="single", roles=["q", "k", "v", "o", "gate", "up", "down"])),
        ("/allocate", dict(target=50, refine=False)),
        ("/load_model", dict(choice="/etc", custom="")),
        ("/export_recipe", {}),
        ("/export_model", {}),
    ]
    failed = []
    started = time.monotonic()
    for api, inputs in calls:
        reply = p.call(api, timeout=300, **inputs)
        if reply.ok == (api == "/load_model"):  # a folder of the server's is refused, all else answers
            failed.append(f"{api}: {reply.outcome()[:90]}")
    detail = f"{len(calls) - len(failed)}/{len(calls)} as expected in {time.monotonic() - started:.0f} s"
    return Check(
        "a visitor's tour of every endpoint", not failed, detail + (f"; not: {failed}" if failed else "")
    )


def check_sentinel(received: Received, setup: Setup) -> list[Check]:
    """No byte any visitor got names the sentinel folders (nor the real folders their links lead to)."""
    from app_server import REAL_CACHE

    volume = received.volume()
    needles = {
        "the sentinel": setup.sentinel,
        "the real data folder": str(setup.real_data),
        "the real model cache": str(REAL_CACHE),
    }
    checks = []
    for what, needle in needles.items():
        count, where = received.hits(needle)
        checks.append(
            Check(
                f"server paths: {what}",
                count == 0,
                f"{count} hits (target 0) in {volume} visitors got" + (f"; in: {where}" if where else ""),
            )
        )
    return checks


# ----- the phase -------------------------------------------------------------------------------------
def hostile(data_dir: str, inflate_mb: int = 256, result: Path = RESULT) -> int:
    """Run every check on one sentinel server, print the lines and write them to ``result``."""
    t_start = time.monotonic()
    setup = sentinel_folders(Path(data_dir))
    server = start_server(setup)
    received = Received(server.url, setup.root / "downloads")
    pid = server.process.pid
    print(f"app up in {time.monotonic() - t_start:.1f} s (pid {pid}, sentinel {setup.sentinel})", flush=True)
    url = server.url
    steps: list[tuple[str, Callable[[], list[Check] | Check]]] = [
        ("limits", lambda: check_limits(url, received)),
        ("observations", lambda: check_observations(url, received)),
        ("url upload", lambda: check_url_upload(url, received)),
        ("burst", lambda: check_burst(url, received)),
        ("sessions", lambda: check_sessions(url, received, pid, setup.budget_flag)),
        ("tour", lambda: sentinel_tour(url, received, setup.root)),
        ("parquet", lambda: check_parquet(url, received, pid, setup.root, inflate_mb)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        t0 = time.monotonic()
        try:
            out = step()
        except Exception as err:  # noqa: BLE001 - a broken step is a failed check, the others still run
            out = Check(name, False, f"the check itself failed: {type(err).__name__}: {str(err)[:200]}")
        new = out if isinstance(out, list) else [out]
        checks += new
        for check in new:
            print(check.line(), flush=True)
        print(f"  ({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    checks += check_sentinel(received, setup)
    alive = server.alive()
    server.stop()
    shutil.rmtree(setup.root, ignore_errors=True)
    passed = sum(c.passed for c in checks)
    budget = (
        f"--state-budget-mb {STATE_BUDGET_MB}" if setup.budget_flag else "no --state-budget-mb in this app"
    )
    lines = [
        f"bench_public --phase hostile: {time.monotonic() - t_start:.0f} s, CPU, loopback; "
        f"{passed}/{len(checks)} checks pass; app alive at the end: {alive}",
        f"app: --public, limits calibration {LIMITS['calibration']:,} tokens, {LIMITS['windows']} windows x "
        f"{LIMITS['seqlen']:,} tokens, session TTL 120 min, {budget}",
        *[c.line() for c in checks],
    ]
    text = "\n".join(lines)
    print("\n" + text)
    result.parent.mkdir(exist_ok=True)
    result.write_text(text + "\n")
    return 0 if passed == len(checks) else 1
