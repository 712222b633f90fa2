"""Signing in with a one-time link, and signing out.

A link (``/auth/sign-in?token=…``, a token of purpose ``sign-in`` with a ``jti``) is
checked on GET and spent only by the POST of the button its page shows, so a mail scanner
or a chat preview that fetches links leaves it usable. That POST (a same-origin form, the
token in its body) answers with a new session token as the ``prefect_jwt`` cookie, so the
link's own token is never a credential. Sign-out is a POST with the dashboard's Origin
(its GET shows a button), so another site cannot sign an admin out.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import parse_qs

from starlette.responses import PlainTextResponse, Response

from backjobs.dashboard.asgi import Receive, Scope, Send, SiteOrigin, form_field
from backjobs.dashboard.credentials import Credentials, Via
from backjobs.dashboard.pages import (
    refusal_response,
    sign_in_form_response,
    sign_out_form_response,
    signed_in_response,
    signed_out_response,
    with_csp,
)
from backjobs.dashboard.tokens import AdminClaims, Channel, Purpose, TokenError, mint_token

logger = logging.getLogger(__name__)

MAX_FORM_BYTES = 16 * 1024  # a sign-in form holds one token
INVALID = "This sign-in link is invalid or has expired."
USED = "This sign-in link was already used."


class LinkCheck(NamedTuple):
    status: int
    problem: str
    claims: AdminClaims | None  # only when the link lets an admin in


class SignIn:
    """``/auth/sign-in`` and ``/auth/sign-out``."""

    def __init__(
        self,
        *,
        credentials: Credentials,
        secret: str,
        origin: SiteOrigin,
        login_url: str | None,
        session_minutes: int,
    ) -> None:
        self._credentials = credentials
        self._secret = secret
        self._origin = origin
        self._login_url = login_url
        self._session_minutes = session_minutes

    async def sign_in(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET shows the link's button; its POST spends the link and sets the session."""
        method = scope["method"]
        if method not in ("GET", "HEAD", "POST"):
            return await _method_not_allowed()(scope, receive, send)
        spend = method == "POST"
        if spend and not self._origin.same_origin(scope):
            logger.warning("refused a sign-in: form posted without the dashboard's Origin")
            return await self._refusal(scope, 403)(scope, receive, send)
        if spend:
            token = await form_field(receive, "token", limit=MAX_FORM_BYTES)
        else:
            token = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        link = await self.check_link(token, spend=spend)
        if link.claims is None:
            logger.warning("refused a sign-in link (%s)", link.status)
            return await self._refusal(scope, link.status, link.problem)(scope, receive, send)
        response = self._session(scope, link.claims) if spend else sign_in_form_response(token)
        await response(scope, receive, with_csp(send))

    async def check_link(self, token: str, *, spend: bool) -> LinkCheck:
        """Whether ``token`` is an unspent link of an admin; ``spend`` uses it up."""
        try:
            claims = self._credentials.claims(token, Channel.LINK)
        except TokenError:
            return LinkCheck(401, INVALID, None)
        if not claims.jti:  # not minted as a one-time link
            return LinkCheck(401, INVALID, None)
        access = await self._credentials.human(token, Via.NOTHING, Channel.LINK)
        if access.status != 200:
            return LinkCheck(access.status, "", None)
        used = self._credentials.used_links
        if used.used(claims.jti) or (spend and not used.claim(claims.jti, claims.exp)):
            return LinkCheck(401, USED, None)
        return LinkCheck(200, "", claims)

    async def sign_out(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method in ("GET", "HEAD"):
            return await sign_out_form_response()(scope, receive, with_csp(send))
        if method != "POST":
            return await _method_not_allowed()(scope, receive, send)
        if not self._origin.same_origin(scope):
            logger.warning("refused a sign-out: posted without the dashboard's Origin")
            return await self._refusal(scope, 403)(scope, receive, send)
        response = signed_out_response(self._origin.cookie_secure(scope))
        await response(scope, receive, with_csp(send))

    def _session(self, scope: Scope, claims: AdminClaims) -> Response:
        """The answer to a spent link: a new session token of its own as the cookie."""
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
        return signed_in_response(session, expires, self._origin.cookie_secure(scope))

    def _refusal(self, scope: Scope, status: int, problem: str = "") -> Response:
        return refusal_response(scope, status, problem, login_url=self._login_url, html=True)


def _method_not_allowed() -> Response:
    return PlainTextResponse("Method Not Allowed", 405, {"allow": "GET, HEAD, POST"})
