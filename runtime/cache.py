"""Small bounded caches: an LRU held to a number of entries and a number of bytes, and a cap on
a folder of cache files (oldest deleted first).

The pruner memoizes calibration ids, activation statistics and score ranks; on a server that
stays up for weeks, each new calibration set would otherwise add ~200 MB that is never freed.
The host sets the bounds (``configure``); the defaults fit a laptop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CacheLimits:
    entries: int = 4  # per cache (calibration ids, statistics, ranks)
    bytes: int = 1 << 30  # per cache
    disk_bytes: int = 4 << 30  # the statistics folder on disk


LIMITS = CacheLimits()


def configure(
    entries: int | None = None, megabytes: float | None = None, disk_megabytes: float | None = None
) -> CacheLimits:
    """Set the bounds of every cache made from now on (and the disk cap, read at each write)."""
    if entries is not None:
        LIMITS.entries = max(1, int(entries))
    if megabytes is not None:
        LIMITS.bytes = max(1, int(megabytes * 2**20))
    if disk_megabytes is not None:
        LIMITS.disk_bytes = max(0, int(disk_megabytes * 2**20))
    return LIMITS


def nbytes(value: Any) -> int:
    """Bytes held by tensors in ``value`` (nested dicts, lists, dataclasses with a ``sq_norms``)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class LRU:
    """A dict-like cache that keeps at most ``entries`` values and ``max_bytes`` bytes (tensor
    bytes, measured at each insertion, so a value that grows after insertion, like a rank table,
    counts from the next one); the least recently used entries go first, never the newest."""

    def __init__(
        self, entries: int | None = None, max_bytes: int | None = None, size: Callable[[Any], int] = nbytes
    ):
        self.entries = entries
        self.max_bytes = max_bytes
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def _limits(self) -> tuple[int, int]:
        return (self.entries or LIMITS.entries, self.max_bytes or LIMITS.bytes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._data))

    def __getitem__(self, key: Hashable) -> Any:
        with self._lock:
            self._data.move_to_end(key)
            return self._data[key]

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self[key] if key in self._data else default

    def __setitem__(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._trim()

    def setdefault(self, key: Hashable, default: Any) -> Any:
        if key not in self._data:
            self[key] = default
        return self[key]

    def pop(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def nbytes(self) -> int:
        return sum(self.size(v) for v in self._data.values())

    def _trim(self) -> None:
        entries, max_bytes = self._limits()
        while len(self._data) > 1 and (len(self._data) > entries or self.nbytes() > max_bytes):
            self._data.popitem(last=False)
            self.evictions += 1


def cap_folder(folder: Path, max_bytes: int | None = None, pattern: str = "*") -> int:
    """Delete the oldest files of ``folder`` until it holds at most ``max_bytes``; returns the count."""
    limit = LIMITS.disk_bytes if max_bytes is None else max_bytes
    files = []
    for path in folder.glob(pattern):
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.is_file():
            files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, path in sorted(files):
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed += 1
    return removed
