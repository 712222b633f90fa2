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

What each may call is :mod:`backjobs.dashboard.roles` (an allow-list for admins: deny by
default); each changing request is audited (:mod:`backjobs.dashboard.audit`); a socket
closes when its credential ends (:mod:`backjobs.dashboard.sockets`); the UI's pages carry
a Content-Security-Policy that lets them load and call nothing but the dashboard.

Everything else gets 401 (no, forged, malformed or expired credential) or 403 (a valid
token whose user is not an admin); a refused websocket gets the same status on its
handshake, or close code 1008 after a bad first message. ``GET /api/health`` and
``/api/ready`` stay open for probes. A state-changing request (POST, PUT, PATCH, DELETE)
or a websocket authenticated by the cookie alone must carry an ``Origin`` equal to the
dashboard's own origin, so another site cannot act through a signed-in admin's browser.

A one-time sign-in link (``/auth/sign-in?token=…``, a token of purpose ``sign-in``) is
checked on GET and spent only by the POST of the button its page shows, so a scanner that
fetches links leaves it usable; that POST answers with a new session token as the cookie.
Sign-out is a POST with the dashboard's Origin (its GET shows a button).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from enum import Enum
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from backjobs.dashboard import audit
from backjobs.dashboard.audit import Who
from backjobs.dashboard.pages import (
    CONTENT_SECURITY_POLICY,
    refusal_page,
    sign_in_form_response,
    sign_out_form_response,
    signed_in_response,
    signed_out_response,
)
from backjobs.dashboard.roles import HUMAN_SOCKETS, Kind, Role, check_body, decide
from backjobs.dashboard.sockets import (
    WS_POLICY_VIOLATION,
    ASGIApp,
    GuardedSocket,
    Message,
    Receive,
    Scope,
    Send,
    relay,
)
from backjobs.dashboard.tokens import (
    COOKIE_NAME,
    SIGN_IN_PATH,
    SIGN_OUT_PATH,
    AdminClaims,
    AdminDirectory,
    Channel,
    Purpose,
    TokenError,
    UsedTokenIds,
    mint_token,
    verify_token,
)

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/api/health", "/api/ready"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM_BYTES = 16 * 1024  # a sign-in form holds one token
MAX_CHECKED_BODY_BYTES = 1024 * 1024  # a run's parameters
FIRST_MESSAGE_TIMEOUT_SECONDS = 10.0


class Via(Enum):
    NOTHING = "nothing"  # no credential presented
    MACHINE = "machine"
    BEARER = "bearer"
    COOKIE = "cookie"


class Access(NamedTuple):
    status: int  # 200 let in, 401, 403, 503
    via: Via
    who: Who = audit.MACHINE
    exp: int | None = None  # a human's token's exp

    @property
    def role(self) -> Role:
        return Role.MACHINE if self.via is Via.MACHINE else Role.HUMAN


class Checked(NamedTuple):
    allowed: bool
    kind: Kind
    reason: str
    receive: Receive  # replays the body when it was read for a check


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
        session_minutes: int = 480,
        max_token_minutes: int = 10080,
    ) -> None:
        self.app = app
        self._secret = secret
        self._admins = admins
        self._auth_string = auth_string.encode() if auth_string else None
        self._public_origin = _origin_of(public_url) if public_url else None
        self._login_url = login_url
        self._session_minutes = session_minutes
        self._max_token_minutes = max_token_minutes
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
            return await self._sign_out(scope, receive, send)
        access = await self._http_access(scope)
        if access.status != 200:
            return await self._refusal(scope, access.status)(scope, receive, send)
        decision = await self._decide(scope, access, receive)
        receive = decision.receive
        if not decision.allowed:
            logger.warning("refused %s %s to %s: %s", method, path, access.who, decision.reason)
            if decision.kind is Kind.OPERATE:
                audit.log_change(who=access.who, method=method, path=path, status=403)
            return await self._refusal(scope, 403, decision.reason)(scope, receive, send)
        if not path.startswith("/api/"):
            send = _with_csp(send)
        if decision.kind is Kind.OPERATE:
            return await self._audited(scope, receive, send, access.who)
        await self.app(scope, receive, send)

    async def _http_access(self, scope: Scope) -> Access:
        access = await self._authenticate(Headers(scope=scope))
        if access[:2] == (200, Via.COOKIE) and scope["method"] not in SAFE_METHODS:
            if not self._same_origin(scope):
                method, path = scope["method"], scope["path"]
                logger.warning("refused %s %s: cookie without the dashboard's Origin", method, path)
                access = access._replace(status=403)
        return access

    async def _decide(self, scope: Scope, access: Access, receive: Receive) -> Checked:
        """The role's decision, with the request's JSON body checked where a rule says so."""
        query = scope.get("query_string", b"")
        decision = decide(access.role, scope["method"], scope["path"], query)
        checked = Checked(decision.allowed, decision.kind, decision.reason, receive)
        if decision.allowed and decision.body_check is not None:
            body, replay = await _buffered(receive)
            problem = check_body(decision.body_check, body) if body is not None else "too big"
            checked = checked._replace(receive=replay)
            if problem is not None:
                checked = checked._replace(allowed=False, reason=problem)
        return checked

    async def _audited(self, scope: Scope, receive: Receive, send: Send, who: Who) -> None:
        status, captured = [500], bytearray()
        keep_body = audit.creates_run(scope["path"])

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif keep_body and len(captured) <= audit.MAX_CAPTURED_BYTES:
                captured.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            audit.log_change(
                who=who,
                method=scope["method"],
                path=scope["path"],
                status=status[0],
                response_body=bytes(captured),
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        access = await self._authenticate(headers)
        if access.via is Via.COOKIE and access.status == 200 and not self._same_origin(scope):
            access = access._replace(status=403)
        if access.via is not Via.NOTHING:
            if access.status == 200 and not self._socket_allowed(scope, access):
                access = access._replace(status=403)
            if access.status != 200:
                return await _deny_handshake(scope, receive, send, access.status)
            socket = GuardedSocket(receive, send, path=scope["path"], replay=[], accepted=False)
            return await self._relay(scope, socket, access)
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
        access = await self._message_access(_auth_message_token(first))
        if access.status == 200 and not self._socket_allowed(scope, access):
            access = access._replace(status=403)
        if access.status != 200:
            reason = "Unauthorized" if access.status == 401 else "Forbidden"
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": reason})
            return
        socket = GuardedSocket(
            receive, send, path=scope["path"], replay=[connect, first], accepted=True
        )
        await self._relay(scope, socket, access)

    def _socket_allowed(self, scope: Scope, access: Access) -> bool:
        return access.role is Role.MACHINE or scope["path"] in HUMAN_SOCKETS

    async def _relay(self, scope: Scope, socket: GuardedSocket, access: Access) -> None:
        still_allowed = None
        if access.role is Role.HUMAN and access.who.user_id is not None:
            user_id, max_age = access.who.user_id, self._admins.cache_seconds / 2

            async def still_admin() -> bool:
                return (await self._admins.lookup(user_id, max_age=max_age)).is_admin

            still_allowed = still_admin
        await relay(
            self.app,
            scope,
            socket,
            exp=access.exp,
            still_allowed=still_allowed,
            check_seconds=self._admins.cache_seconds / 2,
        )

    async def _authenticate(self, headers: Headers) -> Access:
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "basic":
                ok = self._machine_header_ok(authorization)
                return Access(200 if ok else 401, Via.MACHINE)
            if scheme.lower() == "bearer":
                return await self._human(value.strip(), Via.BEARER, Channel.BEARER)
            return Access(401, Via.BEARER)
        token = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME)
        if token:
            return await self._human(token, Via.COOKIE, Channel.COOKIE)
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

    async def _message_access(self, token: str | None) -> Access:
        """A first-message token: the machine auth string, or an admin's API token."""
        if not token:
            return Access(401, Via.NOTHING)
        if self._auth_string is not None and hmac.compare_digest(token.encode(), self._auth_string):
            return Access(200, Via.MACHINE)
        return await self._human(token, Via.BEARER, Channel.BEARER)

    def _claims(self, token: str, channel: Channel) -> AdminClaims:
        claims = verify_token(
            token,
            secret=self._secret,
            now=time.time(),
            max_minutes=self._max_token_minutes,
            channel=channel,
        )
        if channel is not Channel.LINK and claims.jti and self._used_links.used(claims.jti):
            raise TokenError("a spent sign-in link")
        return claims

    async def _human(self, token: str, via: Via, channel: Channel) -> Access:
        try:
            claims = self._claims(token, channel)
        except TokenError:
            return Access(401, via)
        try:
            user = await self._admins.lookup(claims.sub)
        except Exception as exc:  # the app DB is down: nobody is known to be an admin
            logger.error("cannot check admin status: %s", type(exc).__name__)
            return Access(503, via)
        return Access(200 if user.is_admin else 403, via, Who(claims.sub, user.email), claims.exp)

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A one-time sign-in link: GET shows a button, its POST spends the link.

        Opening the link only checks it, so a mail scanner or a chat preview that fetches
        it leaves it usable; pressing the button (a same-origin form POST, the token in
        its body) spends it and sets the cookie to a new session token, so the link's
        own token is never a credential.
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
            return await sign_in_form_response(token)(scope, receive, _with_csp(send))
        now = datetime.now(UTC)
        session = mint_token(
            sub=claims.sub,
            secret=self._secret,
            now=now,
            minutes=self._session_minutes,
            purpose=Purpose.SESSION,
        )
        logger.info("admin user:%s signed in to the dashboard", claims.sub)
        expires = int(now.timestamp()) + self._session_minutes * 60
        response = signed_in_response(session, expires, self._cookie_secure(scope))
        await response(scope, receive, _with_csp(send))

    async def _check_link(self, token: str, *, spend: bool) -> tuple[int, str, AdminClaims | None]:
        """(status, problem, claims): claims only when the link lets an admin in."""
        invalid = "This sign-in link is invalid or has expired."
        try:
            claims = self._claims(token, Channel.LINK)
        except TokenError:
            return 401, invalid, None
        if not claims.jti:  # not minted as a one-time link
            return 401, invalid, None
        access = await self._human(token, Via.NOTHING, Channel.LINK)
        if access.status != 200:
            return access.status, "", None
        if self._used_links.used(claims.jti) or (
            spend and not self._used_links.claim(claims.jti, claims.exp)
        ):
            return 401, "This sign-in link was already used.", None
        return 200, "", claims

    async def _sign_out(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method in ("GET", "HEAD"):
            return await sign_out_form_response()(scope, receive, _with_csp(send))
        if method != "POST":
            refused = PlainTextResponse("Method Not Allowed", 405, {"allow": "GET, HEAD, POST"})
            return await refused(scope, receive, send)
        if not self._same_origin(scope):
            logger.warning("refused a sign-out: posted without the dashboard's Origin")
            return await self._refusal(scope, 403, html=True)(scope, receive, send)
        response = signed_out_response(self._cookie_secure(scope))
        await response(scope, receive, _with_csp(send))

    def _refusal(
        self, scope: Scope, status: int, problem: str = "", *, html: bool = False
    ) -> Response:
        headers = Headers(scope=scope)
        wants_html = "text/html" in headers.get("accept", "") and not scope["path"].startswith(
            "/api/"
        )
        if not (html or wants_html):
            message = {401: "Unauthorized", 403: "Forbidden"}.get(status, "Unavailable")
            if status == 403 and problem:
                message = f"Forbidden: {problem}"
            return JSONResponse({"exception_message": message}, status_code=status)
        response = HTMLResponse(refusal_page(status, problem, self._login_url), status_code=status)
        response.headers["content-security-policy"] = CONTENT_SECURITY_POLICY
        return response

    def _same_origin(self, scope: Scope) -> bool:
        origin = Headers(scope=scope).get("origin")
        if origin is None:
            return False
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        own = f"{scheme}://{Headers(scope=scope).get('host', '')}"
        return origin in (own, self._public_origin)

    def _cookie_secure(self, scope: Scope) -> bool:
        return scope.get("scheme") == "https" or (self._public_origin or "").startswith("https:")


def _with_csp(send: Send) -> Send:
    """``send`` that adds the UI's Content-Security-Policy to a response's headers."""

    async def send_with_csp(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v) for k, v in message.get("headers", []) if k != b"content-security-policy"
            ]
            headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_csp


async def _buffered(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole request body (None when too big) and a ``receive`` that replays it."""
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
        if size > MAX_CHECKED_BODY_BYTES:
            return None, receive
    body = b"".join(chunks)
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


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
