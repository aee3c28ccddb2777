"""What the server process itself needs from its host: whether the hub answers, and freed heap
handed back to the OS."""

from __future__ import annotations

import ctypes
import os
import socket


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


def trim_heap() -> None:
    """Hand freed heap back to the OS: glibc keeps what a thread freed in that thread's arena, and
    every job runs in a thread of its own, so what expired sessions freed would stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
