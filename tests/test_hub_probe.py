"""The hub check asks the hub the libraries will use ($HF_ENDPOINT) over HTTP, and honours
HF_HUB_OFFLINE; tested against a real HTTP server on loopback and a closed port."""

from __future__ import annotations

import http.server
import os
import socket
import threading

import pytest

from runtime import hub


@pytest.fixture
def local_hub():
    """An HTTP server on 127.0.0.1 that answers every request with 200 (a hub mirror stand-in)."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_hub_at_hf_endpoint_is_reachable_and_a_closed_one_is_not(local_hub, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", local_hub + "/")
    assert hub.hub_endpoint() == local_hub and hub.hub_reachable(timeout=2)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert not hub.hub_reachable(timeout=2)


def test_offline_is_set_only_when_the_hub_does_not_answer(local_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # not offline; restored after the test
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_ENDPOINT", local_hub)
    assert hub.go_offline_if_no_hub() is False and os.environ["HF_HUB_OFFLINE"] == "0"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert hub.go_offline_if_no_hub() is True and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_ENDPOINT", local_hub)
    assert hub.go_offline_if_no_hub() is True  # already offline: asked once, not again
