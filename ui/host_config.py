"""Every hosting setting of the app from a flag or an environment variable, named in one table.

A Space owner configures through Variables and Secrets (environment variables), a classroom host
through flags. ``SETTINGS`` names each setting's flag and variable once; the app's hosting flags
and their help, the fallback to the environment, the message for a bad value and the README's
"Space Variables" table are all made from it. A flag wins over its variable. A bad value, from
either, is one line naming where it came from (``HostConfigError``), never a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prune.errors import LabError
from runtime.cache import CacheLimits
from runtime.memory import STATE_CAP, STATE_SHARE
from runtime.paths import CACHE_ENV, DATA_ENV
from ui.hosting import ZERO_GPU_MAX_S, Hosting, Limits

PREFIX = "PRUNING_LAB_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class HostConfigError(LabError, ValueError):
    """A hosting flag or environment variable with a value the app cannot use."""


def _bool(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _number(text: str, zero_ok: bool = False) -> float:
    words = "a number >= 0" if zero_ok else "a number > 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
    return value


def _login(text: str) -> tuple[str, str]:
    user, colon, password = text.partition(":")
    if not (user.strip() and colon and password):
        raise argparse.ArgumentTypeError("expected USER:PASS")  # never echo a password
    return user.strip(), password


def _folder(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    return str(path.resolve())


# kind -> (a flag value -> the setting, what a variable holds)
KINDS: dict[str, tuple[Callable[[str], object], str]] = {
    "bool": (_bool, "`true` or `false`"),
    "text": (str, "comma list"),
    "logins": (_login, "comma list of `USER:PASS` (a Secret)"),
    "folder": (_folder, "existing folder"),
    "path": (lambda text: str(Path(text).expanduser()), "folder (made if missing)"),
    "count": (_count, "whole number ≥ 1"),
    "number": (_number, "number > 0"),
    "size": (lambda text: _number(text, zero_ok=True), "number ≥ 0"),
}

METAVARS = {"text": "A,B", "folder": "DIR", "path": "DIR"}


@dataclass(frozen=True)
class Setting:
    """One hosting setting: ``name`` is its attribute on the parsed arguments."""

    name: str
    flag: str
    kind: str
    help: str
    default: str = ""  # what applies when neither flag nor variable is set, for the README
    limit: str = ""  # the ``Limits`` field it sets (its default is read from there)
    variable: str = ""  # empty: PRUNING_LAB_ + the flag's name

    @property
    def env(self) -> str:
        return self.variable or PREFIX + self.flag.lstrip("-").replace("-", "_").upper()

    def from_text(self, text: str, where: str) -> object:
        """The value of ``text`` read from ``where`` (a variable; flags are parsed by argparse)."""
        parse = KINDS[self.kind][0]
        try:
            if self.kind == "logins":
                return [parse(item) for item in text.split(",") if item.strip()]
            return parse(text)
        except argparse.ArgumentTypeError as err:
            raise HostConfigError(f"{where} ({self.flag}): {err}") from None

    def default_text(self) -> str:
        if not self.limit:
            return self.default
        cpu, gpu = (_amount(getattr(Limits.for_device(device), self.limit)) for device in ("cpu", "cuda"))
        public = cpu if cpu == gpu else f"{cpu} (CPU), {gpu} (GPU)"
        return f"public: {public}; local: none"


def _amount(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


CACHE = CacheLimits()
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "public",
        "--public",
        "bool",
        "visitors choose only the host's models; every request is limited",
        "on when `SPACE_ID` is set (a Space)",
    ),
    Setting(
        "models",
        "--models",
        "text",
        "the models visitors may choose (public)",
        "the offline aliases, after the hub's SmolLM2 when that is the start model",
    ),
    Setting(
        "allow_custom_models",
        "--allow-custom-models",
        "bool",
        "public: visitors may also type public hub ids (never loaded with the host's token)",
        "false",
    ),
    Setting("auth", "--auth", "logins", "require a login (repeat the flag for more users)", "no login"),
    Setting("data_dir", "--data-dir", "folder", "offline data folder", "the hub", variable=DATA_ENV),
    Setting(
        "cache_dir",
        "--cache-dir",
        "path",
        "model conversions, statistics, task results",
        "`~/.cache/pruning-lab` (`/data/pruning-lab` with persistent storage)",
        variable=CACHE_ENV,
    ),
    Setting(
        "session_ttl",
        "--session-ttl",
        "number",
        "minutes an idle session keeps its masks and files",
        f"{Hosting.session_ttl_s / 60:g}",
    ),
    Setting(
        "state_budget_mb",
        "--state-budget-mb",
        "number",
        "MB of memory for every session's kept pruned state together (1 bit per pruned weight); past "
        "it the oldest idle ones are evicted and pruned again from their recipe when used",
        f"public: {STATE_SHARE:g} of the CPU memory free after the model loads, at most "
        f"{STATE_CAP / 2**20:,.0f}; local: none",
    ),
    Setting(
        "max_calibration_tokens",
        "--max-calibration-tokens",
        "count",
        "calibration samples x tokens per sample, per request",
        limit="calibration_tokens",
    ),
    Setting(
        "max_eval_windows",
        "--max-eval-windows",
        "count",
        "evaluation windows per dataset",
        limit="eval_windows",
    ),
    Setting(
        "max_eval_seqlen", "--max-eval-seqlen", "count", "tokens per evaluation window", limit="eval_seqlen"
    ),
    Setting("max_task_docs", "--max-task-docs", "count", "documents per lm-eval task", limit="task_docs"),
    Setting("max_study_points", "--max-study-points", "count", "points per study", limit="study_points"),
    Setting("max_new_tokens", "--max-new-tokens", "count", "generated tokens per answer", limit="new_tokens"),
    Setting("max_upload_mb", "--max-upload-mb", "number", "MB of an uploaded text file", limit="upload_mb"),
    Setting(
        "max_upload_chars",
        "--max-upload-chars",
        "count",
        "characters of text read from an uploaded file (and rows: 1/16 of it), counted while it is read",
        limit="upload_chars",
    ),
    Setting(
        "queue_size",
        "--queue-size",
        "count",
        "requests waiting for a heavy thread at most (Gradio's queue)",
        limit="queue_size",
    ),
    Setting(
        "heavy_threads",
        "--heavy-threads",
        "count",
        "heavy jobs in the model's line (one runs, the others wait), a thread each; 4 more threads "
        "refuse what does not fit, the rest answer readouts and cancels",
        limit="heavy_threads",
    ),
    Setting(
        "job_seconds", "--job-seconds", "number", "time limit of one heavy job, seconds", limit="job_seconds"
    ),
    Setting(
        "model_switches_per_minute",
        "--model-switches-per-minute",
        "count",
        "model switches per visitor and minute",
        limit="model_switches_per_minute",
    ),
    Setting(
        "zero_gpu_seconds",
        "--zero-gpu-seconds",
        "number",
        "ZeroGPU: the most GPU seconds one job asks for",
        f"{ZERO_GPU_MAX_S:g}",
    ),
    Setting(
        "cache_entries",
        "--cache-entries",
        "count",
        "calibration sets / statistics / ranks kept in memory",
        f"{CACHE.entries}",
    ),
    Setting(
        "cache_mb",
        "--cache-mb",
        "number",
        "MB of memory per statistics or rank cache",
        f"{CACHE.bytes / 2**20:g}",
    ),
    Setting(
        "disk_cache_mb",
        "--disk-cache-mb",
        "size",
        "MB of statistics cache on disk",
        f"{CACHE.disk_bytes / 2**20:g}",
    ),
)


def add_flags(group: argparse._ArgumentGroup) -> None:
    """The hosting flags, each unset (None) unless given, so its variable can fill it in."""
    for s in SETTINGS:
        default = s.default_text().replace("`", "")
        options: dict = dict(dest=s.name, default=None, help=f"{s.help} (default: {default}; ${s.env})")
        if s.kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=KINDS[s.kind][0], metavar=METAVARS.get(s.kind, "N"))
        if s.kind == "logins":
            options.update(action="append", metavar="USER:PASS")
        group.add_argument(s.flag, **options)


def from_environment(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """``args`` with each hosting setting no flag set read from its variable (empty means unset)."""
    environ = os.environ if environ is None else environ
    for s in SETTINGS:
        text = environ.get(s.env, "")
        if getattr(args, s.name) is None and text.strip():
            where = f"${s.env}" if s.kind == "logins" else f"${s.env}={text!r}"
            setattr(args, s.name, s.from_text(text, where))
    return args


def startup_warnings(args: argparse.Namespace, public: bool) -> list[str]:
    """What the host should know before anyone connects: an open server, a login without limits."""
    notes = []
    if (args.share or args.host not in (None, "127.0.0.1", "localhost")) and not (args.auth or public):
        notes.append("reachable by others without --auth or --public: anyone can load any model or folder")
    if args.auth and not public:
        notes.append(
            "--auth without --public: whoever logs in may load any model or folder, with no limits "
            "(add --public to limit them)"
        )
    return notes


def variables_table() -> str:
    """The README's "Space Variables" table, made from ``SETTINGS`` (a test keeps them equal)."""
    rows = [
        f"| `{s.env}` | `{s.flag}` | {s.help} | {KINDS[s.kind][1]} | {s.default_text()} |" for s in SETTINGS
    ]
    head = "| Variable | Flag | Setting | Value | Default |\n|---|---|---|---|---|"
    return "\n".join([head, *rows])
