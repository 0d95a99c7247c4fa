"""hub_reachable: fast, cached, and never touches the network in these tests."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from diffseg.hub import hub_reachable


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_answers_false_fast(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    assert hub_reachable(timeout=3.0) is False
    assert time.perf_counter() - start < 2.0


def test_silent_endpoint_times_out(monkeypatch):
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.perf_counter()
        assert hub_reachable(timeout=0.3) is False
        assert time.perf_counter() - start < 1.5


def test_offline_setting_needs_no_request(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://invalid.invalid")
    assert hub_reachable() is False


class _Handler(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        self.send_response(404)  # any answer means the server is there
        self.end_headers()

    def log_message(self, *args):
        pass


def test_local_server_is_reachable_and_the_answer_is_cached(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
        assert hub_reachable() is True
        assert hub_reachable() is True
        assert _Handler.calls == 1
    finally:
        server.shutdown()
        server.server_close()
    assert hub_reachable() is True  # cached for the process
    hub_reachable.cache_clear()
    assert hub_reachable(timeout=0.5) is False


def test_weights_fail_fast_with_the_offline_message_when_the_hub_is_silent(monkeypatch, tmp_path):
    from diffseg.backbones import WeightsNotFoundError, resolve_weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="cannot be reached.*segmind/SSD-1B"):
        resolve_weights("segmind/SSD-1B", "sdxl")
    assert time.perf_counter() - start < 5.0
