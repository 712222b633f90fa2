"""Prefect's ``Webhook`` block, as the server's ``call-webhook`` actions use it, against a
real loopback HTTP server that answers slowly: ten calls at once all get their answer once
``backjobs dashboard``'s fix is applied (and, without it, Prefect's shared transport cuts
them off: the day that test fails, Prefect has fixed it and the fix can go)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.blocks.webhook import Webhook

from backjobs.orchestration import webhook_calls

CALLS = 10


@pytest.fixture
def slow_server() -> Iterator[tuple[str, list[int]]]:
    """A server that reads each call, waits a little (as a busy receiver does) and answers
    204; the call numbers it read."""
    received: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append(int(body))
            time.sleep(0.05 * (CALLS - int(body)) + 0.1)  # the first calls answer last
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def call_all_at_once(url: str) -> list[str]:
    async def one(number: int) -> str:
        hook = Webhook(url=url, allow_private_urls=True)  # as deploy makes the receiver's
        try:
            response = await hook.call(str(number))
        except Exception as exc:
            return repr(exc)
        return str(response.status_code)

    async def all_of_them() -> list[str]:
        return list(await asyncio.gather(*(one(n) for n in range(CALLS))))

    return asyncio.run(all_of_them())


def test_ten_webhook_calls_at_once_all_get_their_answer(
    slow_server: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = slow_server
    monkeypatch.setattr(Webhook, "block_initialization", Webhook.block_initialization)
    webhook_calls.own_transport_per_call()
    webhook_calls.own_transport_per_call()  # idempotent

    outcomes = call_all_at_once(url)

    assert outcomes == ["204"] * CALLS
    assert sorted(received) == list(range(CALLS))


def test_the_fix_keeps_the_ssrf_protection_of_a_block_that_allows_no_private_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Webhook, "block_initialization", Webhook.block_initialization)
    webhook_calls.own_transport_per_call()
    from prefect.utilities.urls import SSRFProtectedAsyncHTTPTransport

    public = Webhook(url="https://hooks.example/alerts", allow_private_urls=False)
    private = Webhook(url="http://127.0.0.1:9/alerts", allow_private_urls=True)

    assert type(public._client._transport) is SSRFProtectedAsyncHTTPTransport
    assert type(private._client._transport) is not SSRFProtectedAsyncHTTPTransport
    assert (
        public._client._transport
        is not Webhook(url="https://hooks.example/a", allow_private_urls=False)._client._transport
    )
    assert public._client.timeout.read == webhook_calls.CALL_TIMEOUT


def test_prefect_alone_still_cuts_concurrent_webhook_calls_off(
    slow_server: tuple[str, list[int]],
) -> None:
    """Why the fix exists. Prefect's block as shipped (the test process never applies the
    fix outside the monkeypatched tests above)."""
    url, _ = slow_server
    assert not getattr(Webhook.block_initialization, "own_transport", False)

    outcomes = call_all_at_once(url)

    # ReadError('') mostly; a call cut while it connects or writes says so otherwise.
    assert any("Error(" in outcome for outcome in outcomes), outcomes
