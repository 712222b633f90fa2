"""End-to-end tests talk to SQLite-backed Prefect servers on a busy machine: such a server
answers 503 `{"exception_message": "Service Unavailable"}` while its database is locked,
and Prefect's own client waits and retries. Every raw HTTP call of these tests does the
same — only for that answer, so a 503 of the gate itself (app database unreachable) is
still seen at once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

PREFECT_RETRYABLE = b'{"exception_message":"Service Unavailable"}'
PATIENCE_S = 60.0


@pytest.fixture(autouse=True)
def _wait_out_a_locked_prefect_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    handle = httpx.HTTPTransport.handle_request

    def patient(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        request.read()  # a body that can be sent again
        deadline = time.monotonic() + PATIENCE_S
        pause = 0.2
        while True:
            response = handle(self, request)
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
            if response.read().replace(b" ", b"") != PREFECT_RETRYABLE:
                return response
            response.close()
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", patient)
    yield
