"""The Hugging Face Hub: whether it answers (asked once before the hub libraries are imported:
offline, a hub id then fails in seconds with a clear message instead of after minutes of retries),
and publishing a written model folder to it."""

from __future__ import annotations

import os
from pathlib import Path

from prune.errors import LabError


class HubError(LabError):
    """The hub refused or could not be reached for a push."""


DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint() -> str:
    """The hub the libraries will talk to: ``$HF_ENDPOINT`` (a mirror, a proxy) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers an HTTP request within ``timeout`` seconds, through the proxies the
    environment names (``HTTPS_PROXY`` and the like, as huggingface_hub's client honours them)."""
    import httpx

    try:
        httpx.head(f"{hub_endpoint()}/api/models", timeout=timeout, follow_redirects=False, trust_env=True)
    except httpx.HTTPError:
        return False
    return True  # any HTTP answer, even an error status, means the hub is there


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it ("1", "ON", "YES" or "TRUE", any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def on_a_space() -> bool:
    """A Hugging Face Space sets ``SPACE_ID`` in every Space's environment."""
    return bool(os.environ.get("SPACE_ID"))


def go_offline_if_no_hub() -> bool:
    """Set HF_HUB_OFFLINE when the hub is unreachable (before transformers reads it). True if offline."""
    if hub_offline():
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


def publish(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a written folder as the model repo ``repo_id`` (made if missing), with ``token`` (a
    visitor's own, from the app's login) or else the usual login (``hf auth login``, ``$HF_TOKEN``);
    the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="Pruned with the Pruning Lab"
        )
    except (HfHubHTTPError, OSError, ValueError) as err:
        login = "log in with Hugging Face again" if token else "log in with `hf auth login`"
        raise HubError(f"could not push to {repo_id}: {err} ({login})") from None
    return str(url)
