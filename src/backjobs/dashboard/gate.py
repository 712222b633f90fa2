"""The dashboard gate: a plain ASGI middleware that lets only admins and machines through.

Its parts, one subject each:

- who is calling: :mod:`backjobs.dashboard.credentials` (the machine's auth string, an
  admin's JWT as Bearer or cookie);
- what each may call: :mod:`backjobs.dashboard.roles` (an allow-list for admins: deny by
  default); each changing request is audited (:mod:`backjobs.dashboard.audit`);
- websockets: :mod:`backjobs.dashboard.socket_gate` (who may open which) and
  :mod:`backjobs.dashboard.sockets` (a socket closes when its credential ends);
- signing in with a one-time link and signing out: :mod:`backjobs.dashboard.sign_in`;
- the UI's pages carry a Content-Security-Policy that lets them load and call nothing but
  the dashboard (:mod:`backjobs.dashboard.pages`).

Everything else gets 401 (no, forged, malformed or expired credential) or 403 (a valid
token whose user is not an admin, or a route that is not an admin's). ``GET /api/health``
and ``/api/ready`` stay open for probes. A state-changing request (POST, PUT, PATCH,
DELETE) authenticated by the cookie alone must carry an ``Origin`` equal to the
dashboard's own origin, so another site cannot act through a signed-in admin's browser.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from starlette.datastructures import Headers
from starlette.responses import Response

from backjobs.dashboard import audit
from backjobs.dashboard.asgi import (
    SAFE_METHODS,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    SiteOrigin,
    buffered_body,
)
from backjobs.dashboard.audit import Who
from backjobs.dashboard.credentials import Access, Credentials, Via
from backjobs.dashboard.pages import refusal_response, with_csp
from backjobs.dashboard.roles import Kind, check_body, decide
from backjobs.dashboard.sign_in import SignIn
from backjobs.dashboard.socket_gate import SocketGate
from backjobs.dashboard.tokens import SIGN_IN_PATH, SIGN_OUT_PATH, AdminDirectory

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/api/health", "/api/ready"})
MAX_CHECKED_BODY_BYTES = 1024 * 1024  # a run's parameters


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
        self._login_url = login_url
        self._origin = SiteOrigin(public_url)
        self._credentials = Credentials(
            secret=secret,
            admins=admins,
            auth_string=auth_string,
            max_token_minutes=max_token_minutes,
        )
        self._sign_in = SignIn(
            credentials=self._credentials,
            secret=secret,
            origin=self._origin,
            login_url=login_url,
            session_minutes=session_minutes,
        )
        self._sockets = SocketGate(app, credentials=self._credentials, origin=self._origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._sockets(scope, receive, send)
        else:  # lifespan: Prefect's services start and stop with the server
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path in OPEN_PATHS and method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if path == SIGN_IN_PATH:
            return await self._sign_in.sign_in(scope, receive, send)
        if path == SIGN_OUT_PATH:
            return await self._sign_in.sign_out(scope, receive, send)
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
            send = with_csp(send)
        if decision.kind is Kind.OPERATE:
            return await self._audited(scope, receive, send, access.who)
        await self.app(scope, receive, send)

    async def _http_access(self, scope: Scope) -> Access:
        access = await self._credentials.from_headers(Headers(scope=scope))
        if access[:2] == (200, Via.COOKIE) and scope["method"] not in SAFE_METHODS:
            if not self._origin.same_origin(scope):
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
            body, replay = await buffered_body(receive, limit=MAX_CHECKED_BODY_BYTES)
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

    def _refusal(self, scope: Scope, status: int, problem: str = "") -> Response:
        return refusal_response(scope, status, problem, login_url=self._login_url)
