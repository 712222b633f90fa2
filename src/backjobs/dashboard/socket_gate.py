"""Who may open a websocket, and which.

A handshake with a credential (``Authorization`` or the cookie, the latter with the
dashboard's ``Origin``) is decided at once: a refused one gets the HTTP status (401, 403)
as its answer. Prefect clients that open a websocket without a header (logs, task-run
subscriptions, the worker channel) authenticate with a first message ``{"type": "auth",
"token": "<auth string>"}`` on the ``prefect`` subprotocol: the gate accepts such a socket
itself, checks that message (an admin's API token is accepted there too) and only then
hands the socket, message included, to Prefect; a bad first message closes it with 1008.

An admin may open only :data:`backjobs.dashboard.roles.HUMAN_SOCKETS` (reading events and
logs); once open, a socket is watched until its credential ends
(:mod:`backjobs.dashboard.sockets`).
"""

from __future__ import annotations

import asyncio
import json

from starlette.datastructures import Headers

from backjobs.dashboard.asgi import ASGIApp, Message, Receive, Scope, Send, SiteOrigin
from backjobs.dashboard.credentials import Access, Credentials, Via
from backjobs.dashboard.roles import HUMAN_SOCKETS, Role
from backjobs.dashboard.sockets import WS_POLICY_VIOLATION, GuardedSocket, relay

FIRST_MESSAGE_TIMEOUT_SECONDS = 10.0


class SocketGate:
    """The gate for ``websocket`` scopes in front of Prefect's ``app``."""

    def __init__(self, app: ASGIApp, *, credentials: Credentials, origin: SiteOrigin) -> None:
        self.app = app
        self._credentials = credentials
        self._origin = origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        access = await self._credentials.from_headers(headers)
        if access.via is Via.NOTHING:
            if "prefect" not in _subprotocols(headers):
                return await deny_handshake(scope, receive, send, 401)
            return await self._first_message_auth(scope, receive, send)
        if access.via is Via.COOKIE and not self._origin.same_origin(scope):
            access = access._replace(status=403) if access.status == 200 else access
        if access.status == 200 and not _allowed(scope, access):
            access = access._replace(status=403)
        if access.status != 200:
            return await deny_handshake(scope, receive, send, access.status)
        socket = GuardedSocket(receive, send, path=scope["path"], replay=[], accepted=False)
        await self._relay(scope, socket, access)

    async def _first_message_auth(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Prefect's handshake, done by the gate so Prefect sees only authenticated sockets."""
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept", "subprotocol": "prefect"})
        try:
            first = await asyncio.wait_for(receive(), FIRST_MESSAGE_TIMEOUT_SECONDS)
        except TimeoutError:
            first = {"type": "timeout"}
        if first["type"] == "websocket.disconnect":
            return
        access = await self._credentials.from_message(_auth_message_token(first))
        if access.status == 200 and not _allowed(scope, access):
            access = access._replace(status=403)
        if access.status != 200:
            reason = "Unauthorized" if access.status == 401 else "Forbidden"
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": reason})
            return
        socket = GuardedSocket(
            receive, send, path=scope["path"], replay=[connect, first], accepted=True
        )
        await self._relay(scope, socket, access)

    async def _relay(self, scope: Scope, socket: GuardedSocket, access: Access) -> None:
        admins = self._credentials.admins
        still_allowed = None
        if access.role is Role.HUMAN and access.who.user_id is not None:
            user_id, max_age = access.who.user_id, admins.cache_seconds / 2

            async def still_admin() -> bool:
                return (await admins.lookup(user_id, max_age=max_age)).is_admin

            still_allowed = still_admin
        await relay(
            self.app,
            scope,
            socket,
            exp=access.exp,
            still_allowed=still_allowed,
            check_seconds=admins.cache_seconds / 2,
        )


def _allowed(scope: Scope, access: Access) -> bool:
    return access.role is Role.MACHINE or scope["path"] in HUMAN_SOCKETS


def _subprotocols(headers: Headers) -> list[str]:
    return [
        part.strip()
        for header in headers.getlist("sec-websocket-protocol")
        for part in header.split(",")
    ]


def _auth_message_token(message: Message) -> str | None:
    if message.get("type") != "websocket.receive" or message.get("text") is None:
        return None  # a binary frame: refused like a missing token
    try:
        data = json.loads(message["text"])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "auth":
        return None
    token = data.get("token")
    return token if isinstance(token, str) else None


async def deny_handshake(scope: Scope, receive: Receive, send: Send, status: int) -> None:
    """Refuse a websocket before accepting it, with ``status`` where the server can say it."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps({"exception_message": "Unauthorized" if status == 401 else "Forbidden"})
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body.encode()})
    else:  # the server answers 403 to a close before accept
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
