"""Whether the Hugging Face Hub answers, asked once before the hub libraries are imported: offline,
a hub id then fails in seconds with a clear message instead of after minutes of retries."""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co accepts a connection within ``timeout`` seconds."""
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
