"""One public app on the tiny chat model that the path and upload tests share (one server start):
every host folder it is given (model, cache, data) carries ``SENTINEL`` in its name, an upload may
hold at most ``UPLOAD_CHARS`` characters, and its outgoing HTTP goes through a loopback proxy that
records every request (a URL Gradio fetched, ``*.hf.co`` passing its SSRF guard, would reach it)."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import app_server
from tiny import save_tiny_chat_model

from runtime.paths import DATA_ENV

SENTINEL = "SENTINEL_f00d"
UPLOAD_CHARS = 5000


class Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP proxy that records every request and answers with a small jsonl file."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        Recorder.seen.append(self.path)
        body = b'{"text": "fetched"}\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def linked_copy(source: Path, target: Path) -> Path:
    """``target`` as a real folder (its own name) whose entries link to ``source``'s."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        (target / entry.name).symlink_to(entry.resolve())
    return target


def start(root: Path, data_dir: Path) -> tuple[app_server.AppServer, http.server.ThreadingHTTPServer]:
    """The server and its proxy (stop both when done)."""
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    model = save_tiny_chat_model(root / f"{SENTINEL}-models" / "tiny-chat")
    cache = root / f"{SENTINEL}-cache" / "cache"
    cache.mkdir(parents=True)
    for part in ("models", "packages", "gguf"):
        (cache / part).symlink_to(app_server.REAL_CACHE / part)
    data = linked_copy(data_dir, root / f"{SENTINEL}-data" / "data")
    flags = ["--public", "--model", str(model), "--models", str(model), "--cache-dir", str(cache)]
    flags += ["--max-upload-chars", str(UPLOAD_CHARS)]
    local = "127.0.0.1,localhost"
    environ = {"HTTP_PROXY": proxy_url, "http_proxy": proxy_url, "NO_PROXY": local, "no_proxy": local}
    saved = os.environ.get(DATA_ENV)
    os.environ[DATA_ENV] = str(data)  # app_server.start passes it as --data-dir
    try:
        server = app_server.start(flags, environ)
    finally:
        if saved is None:
            os.environ.pop(DATA_ENV)
        else:
            os.environ[DATA_ENV] = saved
    return server, proxy
