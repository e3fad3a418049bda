"""A local HTTP server on 127.0.0.1 answering like Electricity Maps v3 ``/carbon-intensity/latest``.

The test sets ``mode`` and ``value`` (under ``lock`` when a provider thread is polling) and reads
``requests``, the (path, auth-token header) of every request received.

Modes: ``ok`` (the zone's latest value), ``missing`` (a body without ``carbonIntensity``),
``bad_json``, ``401``, ``500``, and ``hang`` (answer nothing until ``release`` is set, at most
``hang_seconds``: past any client timeout).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeElectricityMaps:
    def __init__(self, value: object = 322, hang_seconds: float = 5.0) -> None:
        self.mode = "ok"
        self.value = value
        self.hang_seconds = hang_seconds
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v3"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()  # hung handlers return, so the server can shut down
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeElectricityMaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _handler_for(state: FakeElectricityMaps) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with state.lock:
                state.requests.append((self.path, self.headers.get("auth-token")))
                mode, value = state.mode, state.value
            if mode == "hang":
                state.release.wait(state.hang_seconds)
                return
            if mode in ("401", "500"):
                self._send(int(mode), b"Invalid auth-token" if mode == "401" else b"oops", "text/plain")
                return
            if mode == "bad_json":
                self._send(200, b"<html>not json", "application/json")
                return
            body: dict[str, object] = {
                "zone": "DE", "datetime": "2024-05-01T12:00:00.000Z", "updatedAt": "2024-05-01T12:03:00.000Z",
                "emissionFactorType": "lifecycle", "isEstimated": False, "temporalGranularity": "hourly",
            }  # fmt: skip
            if mode != "missing":
                body["carbonIntensity"] = value
            self._send(200, json.dumps(body).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler
