"""Where the lab keeps its cache and looks for offline data."""

from __future__ import annotations

import os
from pathlib import Path

from prune.errors import LabError

CACHE_ENV = "PRUNING_LAB_CACHE"
DATA_ENV = "PRUNING_LAB_DATA"


def cache_dir(*parts: str) -> Path:
    """``~/.cache/pruning-lab/<parts>`` (or ``$PRUNING_LAB_CACHE``), created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pruning-lab")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The offline data folder, if one is set: then datasets are read from it, not the hub."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def set_data_dir(path: str | os.PathLike | None) -> None:
    if path is None:
        return
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LabError(f"data folder not found: {path}")
    os.environ[DATA_ENV] = str(path)
