"""A websocket let through the gate, watched for as long as it is open.

Checking a credential at the handshake only would let a socket outlive it: a human's
socket is closed (1008) at its token's ``exp``, and within
``BACKJOBS_DASHBOARD_ADMIN_CACHE_SECONDS`` of its user being demoted or deleted (the
user is re-read every half interval). Prefect's websockets speak JSON in text frames: a
binary frame is refused with 1003 instead of reaching Prefect's handler (which would fail
on it with a traceback).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from backjobs.dashboard.asgi import ASGIApp, Message, Receive, Scope, Send

StillAllowed = Callable[[], Awaitable[bool]]

WS_POLICY_VIOLATION = 1008
WS_UNSUPPORTED_DATA = 1003
MIN_CHECK_SECONDS = 0.5

logger = logging.getLogger(__name__)


class GuardedSocket:
    """The socket as Prefect's handler sees it: binary frames refused, closable by the gate."""

    def __init__(
        self, receive: Receive, send: Send, *, path: str, replay: list[Message], accepted: bool
    ) -> None:
        self.path = path
        self._receive = receive
        self._send = send
        self._replay = replay
        self._accepted_by_gate = accepted
        self.accepted = accepted
        self.closed = False

    async def receive(self) -> Message:
        if self._replay:
            return self._replay.pop(0)
        if self.closed:
            return {"type": "websocket.disconnect", "code": WS_POLICY_VIOLATION}
        message = await self._receive()
        if message["type"] == "websocket.receive" and message.get("text") is None:
            await self.close(WS_UNSUPPORTED_DATA, "binary frames are not accepted")
            return {"type": "websocket.disconnect", "code": WS_UNSUPPORTED_DATA}
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            if self._accepted_by_gate:
                return  # the gate accepted it to read the first message
            self.accepted = True
        if self.closed:
            return
        if message["type"] == "websocket.close":
            self.closed = True
        await self._send(message)

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.accepted:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        else:  # before the accept, a close is the handshake's 403
            await self._send({"type": "websocket.close", "code": code})


async def relay(
    app: ASGIApp,
    scope: Scope,
    socket: GuardedSocket,
    *,
    exp: int | None,
    still_allowed: StillAllowed | None,
    check_seconds: float,
) -> None:
    """Run Prefect's handler on ``socket``; close it when its credential ends."""
    async with anyio.create_task_group() as group:

        async def run_app() -> None:
            try:
                await app(scope, socket.receive, socket.send)
            finally:
                group.cancel_scope.cancel()

        group.start_soon(run_app)
        if exp is not None or still_allowed is not None:
            group.start_soon(_watch, socket, exp, still_allowed, check_seconds, group.cancel_scope)


async def _watch(
    socket: GuardedSocket,
    exp: int | None,
    still_allowed: StillAllowed | None,
    check_seconds: float,
    cancel_scope: anyio.CancelScope,
) -> None:
    every = max(check_seconds, MIN_CHECK_SECONDS)
    while True:
        wait = every if exp is None else min(every, exp - time.time())
        await anyio.sleep(max(wait, 0.0))
        if exp is not None and time.time() >= exp:
            reason = "token expired"
            break
        if still_allowed is not None:
            try:
                allowed = await still_allowed()
            except Exception as exc:  # the app DB is down: nobody is known to be an admin
                problem = type(exc).__name__
                logger.warning("closing a websocket: cannot check the admin (%s)", problem)
                allowed = False
            if not allowed:
                reason = "Forbidden"
                break
    logger.info("closed a websocket of %s: %s", socket.path, reason)
    await socket.close(WS_POLICY_VIOLATION, reason)
    cancel_scope.cancel()
