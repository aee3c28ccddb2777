"""Hosting from environment variables (a Space's Variables and Secrets), flags winning over them,
bad values as one line, the README's Space Variables table equal to the code's, and the warning
for a login without limits. No model is loaded except where the real start is run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import app
from ui.host_config import SETTINGS, HostConfigError, startup_warnings, variables_table

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "PRUNING_LAB_PUBLIC": "true",
    "PRUNING_LAB_MODELS": "smollm2-135m-instruct, ~/models/mine",
    "PRUNING_LAB_ALLOW_CUSTOM_MODELS": "yes",
    "PRUNING_LAB_AUTH": "ada:lovelace,alan:tu:ring",
    "PRUNING_LAB_SESSION_TTL": "15",
    "PRUNING_LAB_STATE_BUDGET_MB": "64",
    "PRUNING_LAB_MAX_CALIBRATION_TOKENS": "4096",
    "PRUNING_LAB_MAX_EVAL_WINDOWS": "3",
    "PRUNING_LAB_MAX_EVAL_SEQLEN": "256",
    "PRUNING_LAB_MAX_TASK_DOCS": "20",
    "PRUNING_LAB_MAX_STUDY_POINTS": "7",
    "PRUNING_LAB_MAX_NEW_TOKENS": "64",
    "PRUNING_LAB_MAX_UPLOAD_MB": "2.5",
    "PRUNING_LAB_MAX_UPLOAD_CHARS": "12345",
    "PRUNING_LAB_QUEUE_SIZE": "5",
    "PRUNING_LAB_HEAVY_THREADS": "3",
    "PRUNING_LAB_JOB_SECONDS": "90",
    "PRUNING_LAB_MODEL_SWITCHES_PER_MINUTE": "2",
    "PRUNING_LAB_ZERO_GPU_SECONDS": "60",
    "PRUNING_LAB_CACHE_ENTRIES": "2",
    "PRUNING_LAB_CACHE_MB": "256",
    "PRUNING_LAB_DISK_CACHE_MB": "0",
}


def test_environment_variables_configure_every_hosting_setting(tmp_path):
    environ = {**SPACE, "PRUNING_LAB_DATA": str(tmp_path), "PRUNING_LAB_CACHE": "~/lab-cache"}
    args = app.parse_args([], environ)
    hosting = app.hosting_from(args, "cpu")
    assert hosting.public and hosting.allow_custom
    assert hosting.models == ("smollm2-135m-instruct", "~/models/mine")
    limits = hosting.limits
    assert (limits.calibration_tokens, limits.eval_windows, limits.eval_seqlen) == (4096, 3, 256)
    assert (limits.task_docs, limits.study_points, limits.new_tokens) == (20, 7, 64)
    assert (limits.upload_mb, limits.queue_size, limits.job_seconds) == (2.5, 5, 90.0)
    assert limits.upload_chars == 12345
    assert (limits.heavy_threads, limits.model_switches_per_minute) == (3, 2)
    assert hosting.session_ttl_s == 15 * 60 and hosting.zero_gpu_max_s == 60.0
    assert hosting.state_budget_mb == 64.0
    assert args.auth == [("ada", "lovelace"), ("alan", "tu:ring")]  # a password may hold a colon
    assert (args.cache_entries, args.cache_mb, args.disk_cache_mb) == (2, 256.0, 0.0)
    assert args.data_dir == str(tmp_path.resolve())
    assert args.cache_dir == str(Path.home() / "lab-cache")
    assert len(SETTINGS) == len(environ)  # every setting of the table was set above


def test_flags_win_over_the_environment(tmp_path):
    flags = ["--no-public", "--models", "gemma3-270m", "--max-eval-windows", "9", "--auth", "bob:pw"]
    args = app.parse_args([*flags, "--data-dir", str(tmp_path)], {**SPACE, "PRUNING_LAB_DATA": "/nowhere"})
    hosting = app.hosting_from(args, "cpu")
    assert not hosting.public and hosting.models == ("gemma3-270m",)
    assert hosting.limits.eval_windows == 9
    assert hosting.limits.new_tokens == 64  # no flag: the variable still applies
    assert args.auth == [("bob", "pw")] and args.data_dir == str(tmp_path.resolve())
    assert app.parse_args(["--no-allow-custom-models"], SPACE).allow_custom_models is False


def test_public_follows_space_id_unless_a_variable_or_flag_says_otherwise(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/pruning-lab")
    assert app.hosting_from(app.parse_args([], {}), "cpu").public
    assert not app.hosting_from(app.parse_args([], {"PRUNING_LAB_PUBLIC": "off"}), "cpu").public
    assert app.hosting_from(app.parse_args(["--public"], {"PRUNING_LAB_PUBLIC": "0"}), "cpu").public
    monkeypatch.delenv("SPACE_ID")
    assert not app.hosting_from(app.parse_args([], {"PRUNING_LAB_PUBLIC": ""}), "cpu").public  # empty: unset


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "PRUNING_LAB_PUBLIC",
            "maybe",
            "$PRUNING_LAB_PUBLIC='maybe' (--public): expected true or false, got 'maybe'",
        ),
        ("PRUNING_LAB_MAX_EVAL_WINDOWS", "many", "expected a whole number >= 1, got 'many'"),
        ("PRUNING_LAB_MAX_NEW_TOKENS", "0", "(--max-new-tokens): expected a whole number >= 1, got '0'"),
        ("PRUNING_LAB_QUEUE_SIZE", "2.5", "expected a whole number >= 1, got '2.5'"),
        ("PRUNING_LAB_JOB_SECONDS", "-1", "(--job-seconds): expected a number > 0, got '-1'"),
        ("PRUNING_LAB_SESSION_TTL", "nan", "expected a number > 0, got 'nan'"),
        ("PRUNING_LAB_DISK_CACHE_MB", "-5", "expected a number >= 0, got '-5'"),
        (
            "PRUNING_LAB_DATA",
            "/no/such/folder",
            "$PRUNING_LAB_DATA='/no/such/folder' (--data-dir): folder not found",
        ),
        ("PRUNING_LAB_AUTH", "ada:ok,secretword", "$PRUNING_LAB_AUTH (--auth): expected USER:PASS"),
    ],
)
def test_a_bad_variable_is_a_lab_error_naming_it(variable, value, message):
    with pytest.raises(HostConfigError) as caught:
        app.parse_args([], {variable: value})
    assert message in str(caught.value)
    if variable == "PRUNING_LAB_AUTH":
        assert "secretword" not in str(caught.value) and "ada:ok" not in str(caught.value)


def run_app(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PRUNING_LAB_", "SPACE_ID"))}
    environ.update(env, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "app.py"), "--device", "cpu", *flags]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_bad_variable_stops_the_app_with_one_line_and_exit_2():
    result = run_app({"PRUNING_LAB_MAX_EVAL_WINDOWS": "many"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: $PRUNING_LAB_MAX_EVAL_WINDOWS='many' (--max-eval-windows): expected a whole number >= 1, "
        "got 'many'"
    ]


def test_auth_without_public_warns_at_start(tmp_path):
    """The real start prints the warning before the model loads (a model that is not there ends it)."""
    result = run_app({"PRUNING_LAB_AUTH": "ada:lovelace"}, "--model", str(tmp_path / "no-model"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --auth without --public: whoever logs in may load any model or folder, with no limits "
        "(add --public to limit them)"
    ]
    assert result.returncode == 2 and "lovelace" not in result.stderr


def test_startup_warnings():
    def warned(flags: list[str], environ: dict[str, str], public: bool) -> list[str]:
        return [w.split(":")[0] for w in startup_warnings(app.parse_args(flags, environ), public)]

    assert warned(["--auth", "a:b"], {}, public=False) == ["--auth without --public"]
    assert warned([], {"PRUNING_LAB_AUTH": "a:b"}, public=False) == ["--auth without --public"]
    assert warned(["--auth", "a:b"], {}, public=True) == []
    assert warned(["--host", "0.0.0.0"], {}, public=False) == [
        "reachable by others without --auth or --public"
    ]
    assert warned(["--host", "0.0.0.0", "--auth", "a:b"], {}, public=False) == ["--auth without --public"]
    assert warned(["--share"], {}, public=True) == []


def test_every_setting_has_its_own_documented_variable():
    variables = [s.env for s in SETTINGS]
    assert len(set(variables)) == len(variables)
    assert all(re.fullmatch(r"PRUNING_LAB_[A-Z_]+", v) for v in variables)
    assert {"PRUNING_LAB_DATA", "PRUNING_LAB_CACHE"} <= set(variables)  # the names the runtime reads
    help_text = " ".join(subprocess_free_help().split())
    for setting in SETTINGS:
        assert setting.flag in help_text and f"${setting.env}" in help_text


def subprocess_free_help() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        app.parse_args(["--help"], {})
    return out.getvalue()


def test_the_readme_space_variables_table_is_the_code_table():
    """The table lies in the README or in the docs page it links for hosting."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    marked = r"<!-- space-variables:start -->\n(.*?)\n<!-- space-variables:end -->"
    tables = [m.group(1) for page in pages for m in re.finditer(marked, page.read_text(), re.S)]
    assert len(tables) == 1, "one Space Variables table between the space-variables markers"
    assert tables[0] == variables_table(), "paste ui.host_config.variables_table() into the page"
