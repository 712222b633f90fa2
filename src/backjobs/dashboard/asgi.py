"""ASGI plumbing the gate's parts share: the types, the dashboard's own origin, bodies read
once and replayed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SiteOrigin:
    """The dashboard's origin: the Host it is called by, and its public URL behind a proxy."""

    def __init__(self, public_url: str | None) -> None:
        self.public_origin = origin_of(public_url) if public_url else None

    def same_origin(self, scope: Scope) -> bool:
        """Whether the request's ``Origin`` is the dashboard's (absent: no)."""
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            return False
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        return origin in (f"{scheme}://{headers.get('host', '')}", self.public_origin)

    def cookie_secure(self, scope: Scope) -> bool:
        return scope.get("scheme") == "https" or (self.public_origin or "").startswith("https:")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def buffered_body(receive: Receive, *, limit: int) -> tuple[bytes | None, Receive]:
    """The whole request body (None when over ``limit``) and a ``receive`` that replays it."""
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            return None, receive
    body = b"".join(chunks)
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def form_field(receive: Receive, name: str, *, limit: int) -> str:
    """One field of a small urlencoded form body ("" when absent or over ``limit``)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            return ""
        if not message.get("more_body", False):
            break
    values: list[str] = parse_qs(body.decode("latin-1")).get(name, [""])
    return values[0]
