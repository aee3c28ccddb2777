"""What the server process itself needs from its host: freed heap handed back to the OS."""

from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """Hand freed heap back to the OS: glibc keeps what a thread freed in that thread's arena, and
    every job runs in a thread of its own, so what expired sessions freed would stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
