"""Who is calling: the credential a request or a websocket presents, checked.

- a **machine**: ``Authorization: Basic base64(auth string)``, what unmodified Prefect
  clients send when ``PREFECT_API_AUTH_STRING`` is set, checked as Prefect's own server
  checks ``PREFECT_SERVER_API_AUTH_STRING`` (or the bare auth string as a websocket's
  first ``auth`` message);
- an **admin**: a JWT (:mod:`backjobs.dashboard.tokens`) in the ``prefect_jwt`` cookie or
  an ``Authorization: Bearer`` header (or a first ``auth`` message), whose user is an
  admin now.

The answer is an :class:`Access`: 200 (let in), 401 (no, forged, malformed, expired or
spent credential), 403 (a valid token whose user is not an admin) or 503 (the app
database cannot say who is an admin).
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from enum import Enum
from typing import NamedTuple

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from backjobs.dashboard import audit
from backjobs.dashboard.audit import Who
from backjobs.dashboard.roles import Role
from backjobs.dashboard.tokens import (
    COOKIE_NAME,
    AdminClaims,
    AdminDirectory,
    Channel,
    TokenError,
    UsedTokenIds,
    verify_token,
)

logger = logging.getLogger(__name__)


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


class Credentials:
    """Checks credentials against the JWT secret, the machine's auth string and the admins."""

    def __init__(
        self,
        *,
        secret: str,
        admins: AdminDirectory,
        auth_string: str | None,
        max_token_minutes: int,
    ) -> None:
        self.admins = admins
        self.used_links = UsedTokenIds()
        self._secret = secret
        self._auth_string = auth_string.encode() if auth_string else None
        self._max_token_minutes = max_token_minutes

    async def from_headers(self, headers: Headers) -> Access:
        """A request's or a handshake's credential: Authorization first, else the cookie."""
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "basic":
                ok = self._machine_header_ok(authorization)
                return Access(200 if ok else 401, Via.MACHINE)
            if scheme.lower() == "bearer":
                return await self.human(value.strip(), Via.BEARER, Channel.BEARER)
            return Access(401, Via.BEARER)
        token = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME)
        if token:
            return await self.human(token, Via.COOKIE, Channel.COOKIE)
        return Access(401, Via.NOTHING)

    async def from_message(self, token: str | None) -> Access:
        """A first-message token: the machine auth string, or an admin's API token."""
        if not token:
            return Access(401, Via.NOTHING)
        if self._auth_string is not None and hmac.compare_digest(token.encode(), self._auth_string):
            return Access(200, Via.MACHINE)
        return await self.human(token, Via.BEARER, Channel.BEARER)

    def claims(self, token: str, channel: Channel) -> AdminClaims:
        """The claims of a valid token on ``channel``; a spent link's are refused off it."""
        claims = verify_token(
            token,
            secret=self._secret,
            now=time.time(),
            max_minutes=self._max_token_minutes,
            channel=channel,
        )
        if channel is not Channel.LINK and claims.jti and self.used_links.used(claims.jti):
            raise TokenError("a spent sign-in link")
        return claims

    async def human(self, token: str, via: Via, channel: Channel) -> Access:
        try:
            claims = self.claims(token, channel)
        except TokenError:
            return Access(401, via)
        try:
            user = await self.admins.lookup(claims.sub)
        except Exception as exc:  # the app DB is down: nobody is known to be an admin
            logger.error("cannot check admin status: %s", type(exc).__name__)
            return Access(503, via)
        return Access(200 if user.is_admin else 403, via, Who(claims.sub, user.email), claims.exp)

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
