"""The dashboard gate: a plain ASGI middleware that lets only admins and machines through.

Who gets in, on HTTP and websocket alike:

- an **admin**: a JWT (see :mod:`backjobs.dashboard.tokens`) in the ``prefect_jwt``
  cookie or an ``Authorization: Bearer`` header, whose user is an admin now;
- a **machine**: ``Authorization: Basic base64(auth string)``, what unmodified Prefect
  clients send when ``PREFECT_API_AUTH_STRING`` is set, checked as Prefect's own server
  checks ``PREFECT_SERVER_API_AUTH_STRING``. Prefect clients that open a websocket
  without that header (logs, task-run subscriptions, the worker channel) authenticate
  with a first message ``{"type": "auth", "token": "<auth string>"}`` on the ``prefect``
  subprotocol: the gate accepts such a socket itself, checks that message (an admin JWT
  is accepted there too) and only then hands the socket, message included, to Prefect.

Everything else gets 401 (no, forged, malformed or expired credential) or 403 (a valid
token whose user is not an admin); a refused websocket gets the same status on its
handshake, or close code 1008 after a bad first message. ``GET /api/health`` and
``/api/ready`` stay open for probes. A state-changing request (POST, PUT, PATCH, DELETE)
or a websocket authenticated by the cookie alone must carry an ``Origin`` equal to the
dashboard's own origin, so another site cannot act through a signed-in admin's browser.

A one-time sign-in link (``/auth/sign-in?token=…``) is checked on GET and spent only by
the POST of the button its page shows, so a scanner that fetches links leaves it usable.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from enum import Enum
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from backjobs.dashboard.pages import (
    refusal_page,
    sign_in_form_response,
    signed_in_response,
    signed_out_response,
)
from backjobs.dashboard.tokens import (
    COOKIE_NAME,
    SIGN_IN_PATH,
    SIGN_OUT_PATH,
    AdminClaims,
    AdminDirectory,
    TokenError,
    UsedTokenIds,
    verify_token,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/api/health", "/api/ready"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM_BYTES = 16 * 1024  # a sign-in form holds one token
WS_POLICY_VIOLATION = 1008
FIRST_MESSAGE_TIMEOUT_SECONDS = 10.0


class Via(Enum):
    NOTHING = "nothing"  # no credential presented
    MACHINE = "machine"
    BEARER = "bearer"
    COOKIE = "cookie"


class Access(NamedTuple):
    status: int  # 200 let in, 401, 403, 503
    via: Via


class DashboardGate:
    """Wraps Prefect's server app (``create_app()``); see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        secret: str,
        admins: AdminDirectory,
        auth_string: str | None = None,
        public_url: str | None = None,
        login_url: str | None = None,
    ) -> None:
        self.app = app
        self._secret = secret
        self._admins = admins
        self._auth_string = auth_string.encode() if auth_string else None
        self._public_origin = _origin_of(public_url) if public_url else None
        self._login_url = login_url
        self._used_links = UsedTokenIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:  # lifespan: Prefect's services start and stop with the server
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path in OPEN_PATHS and method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if path == SIGN_IN_PATH:
            return await self._sign_in(scope, receive, send)
        if path == SIGN_OUT_PATH:
            return await signed_out_response(self._cookie_secure(scope))(scope, receive, send)
        access = await self._authenticate(Headers(scope=scope))
        if access == (200, Via.COOKIE) and method not in SAFE_METHODS:
            if not self._same_origin(scope):
                logger.warning("refused %s %s: cookie without the dashboard's Origin", method, path)
                access = Access(403, Via.COOKIE)
        if access.status != 200:
            return await self._refusal(scope, access.status)(scope, receive, send)
        await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        access = await self._authenticate(headers)
        if access.via is Via.COOKIE and access.status == 200 and not self._same_origin(scope):
            access = Access(403, Via.COOKIE)
        if access.via is not Via.NOTHING:
            if access.status != 200:
                return await _deny_handshake(scope, receive, send, access.status)
            return await self.app(scope, receive, send)
        if "prefect" not in _subprotocols(headers):
            return await _deny_handshake(scope, receive, send, 401)
        await self._first_message_auth(scope, receive, send)

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
        status = await self._token_status(_auth_message_token(first))
        if status != 200:
            reason = "Unauthorized" if status == 401 else "Forbidden"
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": reason})
            return
        replay = [connect, first]

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        async def send_after_accept(message: Message) -> None:
            if message["type"] != "websocket.accept":  # already accepted above
                await send(message)

        await self.app(scope, replaying_receive, send_after_accept)

    async def _authenticate(self, headers: Headers) -> Access:
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "basic":
                ok = self._machine_header_ok(authorization)
                return Access(200 if ok else 401, Via.MACHINE)
            if scheme.lower() == "bearer":
                return Access(await self._admin_status(value.strip()), Via.BEARER)
            return Access(401, Via.BEARER)
        token = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME)
        if token:
            return Access(await self._admin_status(token), Via.COOKIE)
        return Access(401, Via.NOTHING)

    def _machine_header_ok(self, authorization: str) -> bool:
        # As Prefect's own token_validation middleware: "Basic <base64(auth string)>".
        if self._auth_string is None:
            return False
        try:
            _scheme, credentials = authorization.split()
            decoded = base64.b64decode(credentials)
        except ValueError:
            return False
        return hmac.compare_digest(decoded, self._auth_string)

    async def _token_status(self, token: str | None) -> int:
        """A first-message token: the machine auth string, or an admin JWT."""
        if not token:
            return 401
        if self._auth_string is not None and hmac.compare_digest(token.encode(), self._auth_string):
            return 200
        return await self._admin_status(token)

    async def _admin_status(self, token: str) -> int:
        try:
            claims = verify_token(token, secret=self._secret)
        except TokenError:
            return 401
        try:
            return 200 if await self._admins.is_admin(claims.sub) else 403
        except Exception as exc:  # the app DB is down: nobody is known to be an admin
            logger.error("cannot check admin status: %s", type(exc).__name__)
            return 503

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A one-time sign-in link: GET shows a button, its POST uses the link up.

        Opening the link only checks it, so a mail scanner or a chat preview that fetches
        it leaves it usable; pressing the button (a same-origin form POST, the token in
        its body) spends it and sets the cookie.
        """
        method = scope["method"]
        if method in ("GET", "HEAD"):
            token = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
            spend = False
        elif method == "POST":
            if not self._same_origin(scope):
                logger.warning("refused a sign-in: form posted without the dashboard's Origin")
                return await self._refusal(scope, 403, html=True)(scope, receive, send)
            token = await _form_field(receive, "token")
            spend = True
        else:
            refused = PlainTextResponse("Method Not Allowed", 405, {"allow": "GET, HEAD, POST"})
            return await refused(scope, receive, send)
        status, problem, claims = await self._check_link(token, spend=spend)
        if claims is None:
            logger.warning("refused a sign-in link (%s)", status)
            response = self._refusal(scope, status, problem, html=True)
            return await response(scope, receive, send)
        if not spend:
            return await sign_in_form_response(token)(scope, receive, send)
        logger.info("admin %s signed in to the dashboard", claims.sub)
        response = signed_in_response(token, claims.exp, self._cookie_secure(scope))
        await response(scope, receive, send)

    async def _check_link(self, token: str, *, spend: bool) -> tuple[int, str, AdminClaims | None]:
        """(status, problem, claims): claims only when the link lets an admin in."""
        try:
            claims = verify_token(token, secret=self._secret)
        except TokenError:
            return 401, "This sign-in link is invalid or has expired.", None
        status = await self._admin_status(token)
        if status != 200:
            return status, "", None
        if not claims.jti:  # an API token, not a link
            return 401, "This sign-in link is invalid or has expired.", None
        if self._used_links.used(claims.jti) or (
            spend and not self._used_links.claim(claims.jti, claims.exp)
        ):
            return 401, "This sign-in link was already used.", None
        return 200, "", claims

    def _refusal(
        self, scope: Scope, status: int, problem: str = "", *, html: bool = False
    ) -> Response:
        headers = Headers(scope=scope)
        wants_html = "text/html" in headers.get("accept", "") and not scope["path"].startswith(
            "/api/"
        )
        if not (html or wants_html):
            message = {401: "Unauthorized", 403: "Forbidden"}.get(status, "Unavailable")
            return JSONResponse({"exception_message": message}, status_code=status)
        return HTMLResponse(refusal_page(status, problem, self._login_url), status_code=status)

    def _same_origin(self, scope: Scope) -> bool:
        origin = Headers(scope=scope).get("origin")
        if origin is None:
            return False
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        own = f"{scheme}://{Headers(scope=scope).get('host', '')}"
        return origin in (own, self._public_origin)

    def _cookie_secure(self, scope: Scope) -> bool:
        return scope.get("scheme") == "https" or (self._public_origin or "").startswith("https:")


async def _form_field(receive: Receive, name: str) -> str:
    """One field of a small urlencoded form body ("" when absent or the body is too big)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_FORM_BYTES:
            return ""
        if not message.get("more_body", False):
            break
    values: list[str] = parse_qs(body.decode("latin-1")).get(name, [""])
    return values[0]


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _subprotocols(headers: Headers) -> list[str]:
    return [
        part.strip()
        for header in headers.getlist("sec-websocket-protocol")
        for part in header.split(",")
    ]


def _auth_message_token(message: Message) -> str | None:
    if message.get("type") != "websocket.receive":
        return None
    try:
        data = json.loads(message.get("text") or message.get("bytes") or "")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "auth":
        return None
    token = data.get("token")
    return token if isinstance(token, str) else None


async def _deny_handshake(scope: Scope, receive: Receive, send: Send, status: int) -> None:
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
