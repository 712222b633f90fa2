"""A webhook listener on loopback for tests: every JSON POST it receives, in order.

with WebhookListener() as hook:
    ... hook.url ...
    hook.wait_for(lambda bodies: len(bodies) >= 3, timeout=60)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookListener:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with listener._lock:
                    listener.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.bodies)

    def wait_for(
        self, done: Callable[[list[dict[str, Any]]], bool], *, timeout: float, what: str
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            bodies = self.received()
            if done(bodies):
                return bodies
            if time.monotonic() > deadline:
                raise AssertionError(f"webhook: {what} not seen in {timeout} s; got {bodies}")
            time.sleep(0.5)

    def __enter__(self) -> WebhookListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
