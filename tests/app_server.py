"""One real ``python app.py`` subprocess on 127.0.0.1, shared by test_app.py and test_browser.py.

It runs with a fresh statistics cache (the converted model is linked in), so the first Wanda run
must make exactly one calibration pass and later runs none; and with HF_HUB_OFFLINE=1, so a hub
id fails in seconds, as it does on a machine without internet.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CACHE = Path(os.environ.get("PRUNING_LAB_CACHE") or Path.home() / ".cache" / "pruning-lab")
START_TIMEOUT_S = 600  # the first start on a new machine converts the GGUF model


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    root: Path  # temporary folder: cache, log, downloads
    env: dict[str, str]

    @property
    def log(self) -> str:
        return (self.root / "app.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


_servers: dict[tuple, AppServer] = {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(root: Path) -> dict[str, str]:
    """The app's environment: a private stats cache that links the real converted models."""
    cache = root / "cache"
    cache.mkdir(parents=True)
    for part in ("models", "packages", "gguf"):
        (REAL_CACHE / part).mkdir(parents=True, exist_ok=True)
        (cache / part).symlink_to(REAL_CACHE / part)
    env = dict(os.environ)
    env.update(PRUNING_LAB_CACHE=str(cache), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(extra: list[str] | tuple[str, ...] = (), environ: dict[str, str] | None = None) -> AppServer:
    """Start the app (once per test process, set of extra flags and of extra variables
    ``environ``) and wait until it answers."""
    key = (*extra, *sorted((environ or {}).items()))
    if key in _servers and _servers[key].alive():
        return _servers[key]
    root = Path(tempfile.mkdtemp(prefix="pruning-lab-app-"))
    env = {**app_env(root), **(environ or {})}
    port = free_port()
    args = [
        sys.executable,
        str(ROOT / "app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *extra,
    ]
    if env.get("PRUNING_LAB_DATA"):
        args += ["--data-dir", env["PRUNING_LAB_DATA"]]
    log = (root / "app.log").open("w")
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}/", process, root, env)
    atexit.register(server.stop)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{server.log[-3000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    _servers[key] = server
                    return server
        except OSError:
            time.sleep(1)
    server.stop()
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S} s")
