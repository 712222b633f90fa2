"""Dashboard tokens: HS256 JWTs signed with ``BACKJOBS_JWT_SECRET``, and who is an admin.

The claims the gate reads:

- ``sub`` (required): the user id of the app's ``users`` table, as a string of ASCII
  digits (``"42"``). Only ids are accepted, not emails: an id names one row forever,
  while an email can change hands and has look-alikes (``K`` and the Kelvin sign ``K``
  fold to the same letter in one database and not in another). Anything else is refused
  (401) like a forged token.
- ``exp`` (required): refused once past, and refused when it lies more than
  ``BACKJOBS_DASHBOARD_MAX_TOKEN_MINUTES`` (default 10080, a week) ahead.
- ``purpose`` (optional): what the token is for; a token is refused (401) everywhere else.
  ``sign-in`` is a one-time link, spent at ``POST /auth/sign-in``; ``session`` is what the
  link is exchanged for, the ``prefect_jwt`` cookie; ``api`` is an ``Authorization:
  Bearer`` token (``backjobs dashboard-token`` without ``--url``). A token without a
  ``purpose`` (what the app signs itself) works as cookie, Bearer and link, as before.
- ``jti`` (a link needs one): a link's id. Once a link is spent, a token with that
  ``jti`` is refused everywhere until it expires, even one without a ``purpose``.

Only HS256 is accepted: ``alg: none`` and every other algorithm are refused by PyJWT. The
app can mint the same tokens with its own JWT library and the same secret:
``{"sub": "<user id>", "exp": <unix time>}`` is all the gate needs.
"""

from __future__ import annotations

import re
import threading
import time
import unicodedata
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NamedTuple
from urllib.parse import urlencode

import anyio.to_thread
import jwt
from jwt.warnings import InsecureKeyLengthWarning
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from backjobs.models import User
from backjobs.settings import Settings

ALGORITHM = "HS256"
COOKIE_NAME = "prefect_jwt"
SIGN_IN_PATH = "/auth/sign-in"
SIGN_OUT_PATH = "/auth/sign-out"
USER_ID = re.compile(r"[0-9]{1,18}")  # ASCII only: "²".isdigit() is true; below 2**63


class Purpose(StrEnum):
    SIGN_IN = "sign-in"
    SESSION = "session"
    API = "api"


class Channel(StrEnum):
    """Where a token was presented."""

    LINK = "link"  # the body of POST /auth/sign-in (or the query of its GET)
    COOKIE = "cookie"
    BEARER = "bearer"  # Authorization: Bearer, or a websocket's first auth message


# Which purposes each channel takes; None: a token without a purpose (the app's own).
ACCEPTED: dict[Channel, frozenset[Purpose | None]] = {
    Channel.LINK: frozenset({Purpose.SIGN_IN, None}),
    Channel.COOKIE: frozenset({Purpose.SESSION, None}),
    Channel.BEARER: frozenset({Purpose.API, None}),
}


class TokenError(ValueError):
    """A token that is malformed, forged, of another algorithm, expired, lives too long,
    names no user id, or is presented where its purpose does not belong."""


@dataclass(frozen=True)
class AdminClaims:
    sub: str  # a user id: ASCII digits
    exp: int
    jti: str | None
    purpose: Purpose | None


class UserAccess(NamedTuple):
    is_admin: bool
    email: str | None  # None: no such user


def mint_token(*, sub: str, secret: str, now: datetime, minutes: float, purpose: Purpose) -> str:
    """A signed token for user id ``sub``, valid ``minutes`` from ``now``, with a fresh ``jti``."""
    claims = {
        "sub": sub,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=minutes)).timestamp()),
        "jti": uuid.uuid4().hex,
        "purpose": purpose.value,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(
    token: str, *, secret: str, now: float, max_minutes: float, channel: Channel
) -> AdminClaims:
    """The claims of a valid token presented on ``channel``; :class:`TokenError` otherwise."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.InvalidTokenError as exc:
        raise TokenError(type(exc).__name__) from None
    sub, exp = claims["sub"], int(claims["exp"])
    jti, purpose = claims.get("jti"), claims.get("purpose")
    if not isinstance(sub, str) or not USER_ID.fullmatch(sub):
        raise TokenError("sub is not a user id")
    if exp - now > max_minutes * 60:
        raise TokenError("exp is further ahead than BACKJOBS_DASHBOARD_MAX_TOKEN_MINUTES")
    if purpose is not None and purpose not in set(Purpose):
        raise TokenError("unknown purpose")
    kind = None if purpose is None else Purpose(purpose)
    if kind not in ACCEPTED[channel]:
        raise TokenError(f"a {purpose} token is not accepted as a {channel}")
    return AdminClaims(sub=sub, exp=exp, jti=None if jti is None else str(jti), purpose=kind)


def email_key(email: str) -> str:
    """How two emails are compared: NFKC-normalised and case-folded, then NFKC again
    (Unicode's NFKC_Casefold, near enough): ``Kate@`` with the Kelvin sign K is ``kate@``."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", email.strip()).casefold())


def find_admin_id(session: Session, *, email: str) -> int:
    """The id of the admin with this email; LookupError otherwise.

    Emails are compared by :func:`email_key` on both sides, in Python: SQL ``lower()``
    folds only ASCII on SQLite and per collation on PostgreSQL, so it would let a
    look-alike address match on one database and not on the other. The admins are read
    whole (they are few); two admins whose emails fold alike are refused, never guessed.
    Only the message for a non-admin uses ``lower()`` (to find the user row it names).
    """
    wanted = email_key(email)
    admins = session.execute(select(User.id, User.email).where(User.is_admin.is_(True))).all()
    found = sorted(int(row.id) for row in admins if email_key(row.email) == wanted)
    if len(found) > 1:
        ids = ", ".join(map(str, found))
        raise LookupError(f"admins {ids} all have the email {email!r} once case-folded")
    if found:
        return found[0]
    user = session.execute(
        select(User.id).where(func.lower(User.email) == email.strip().lower())
    ).first()
    if user is None:
        raise LookupError(f"no user with email {email!r} in the app database")
    raise LookupError(f"user {email!r} is not an admin (users.is_admin is false)")


def mint_admin_token(
    session: Session, *, email: str, secret: str, now: datetime, minutes: int, purpose: Purpose
) -> str:
    """A short-lived dashboard token for the admin with this email (LookupError if none)."""
    return mint_token(
        sub=str(find_admin_id(session, email=email)),
        secret=secret,
        now=now,
        minutes=minutes,
        purpose=purpose,
    )


def admin_token(
    email: str, *, settings: Settings, purpose: Purpose, minutes: int | None = None
) -> str:
    """A dashboard token for the admin with this email in the configured app database.

    ``sign_in_url(public_url(settings), admin_token(email, settings=settings,
    purpose=Purpose.SIGN_IN))`` is the one-time sign-in link that ``backjobs
    dashboard-token EMAIL --url`` prints; ``Purpose.API`` is its bare token.
    LookupError when the email is unknown or not an admin's.
    """
    from backjobs.db import make_engine, session_scope

    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session, warnings.catch_warnings():
            # A short development secret: `backjobs dashboard` refuses it off loopback.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return mint_admin_token(
                session,
                email=email,
                secret=settings.jwt_secret.get_secret_value(),
                now=datetime.now(UTC),
                minutes=settings.dashboard_token_minutes if minutes is None else minutes,
                purpose=purpose,
            )
    finally:
        engine.dispose()


def sign_in_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}{SIGN_IN_PATH}?{urlencode({'token': token})}"


def user_access(engine: Engine, user_id: str) -> UserAccess:
    """Whether user ``user_id`` is an admin now, and their email (for the audit log)."""
    with engine.connect() as conn:
        row = conn.execute(select(User.is_admin, User.email).where(User.id == int(user_id))).first()
    return UserAccess(False, None) if row is None else UserAccess(bool(row.is_admin), row.email)


class AdminDirectory:
    """Answers "is user ``user_id`` an admin now?" from the users table, cached ``cache_seconds``.

    Negative answers are cached too, so a promoted or a demoted admin is seen within the
    interval. An open websocket asks with ``max_age`` (half the interval) so that it is
    closed within the interval too. The lookup runs in a worker thread: the event loop
    never waits on the DB.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[UserAccess, float]] = {}

    async def lookup(self, user_id: str, *, max_age: float | None = None) -> UserAccess:
        now = self._clock()
        hit = self._cache.get(user_id)
        fresh_since = now - (self.cache_seconds if max_age is None else max_age)
        if hit is not None and hit[1] > fresh_since:
            return hit[0]
        answer = await anyio.to_thread.run_sync(user_access, self._engine, user_id)
        self._cache[user_id] = (answer, now)
        return answer

    async def is_admin(self, user_id: str) -> bool:
        return (await self.lookup(user_id)).is_admin


class UsedTokenIds:
    """The ``jti`` of every sign-in link already used, kept in memory until it expires.

    Memory of one process: restarting the dashboard forgets them, which lets an unexpired
    link be used once more; links are short-lived (``--minutes``, default 60) for that.
    The sign-in link's session is a token of its own, so a restart never revives a link
    as a credential.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def used(self, jti: str) -> bool:
        """Whether ``jti`` was already claimed (and has not expired since)."""
        with self._lock:
            return self._used.get(jti, -1) >= self._clock()

    def claim(self, jti: str, exp: int) -> bool:
        """True the first time ``jti`` is seen, False every later time."""
        now = self._clock()
        with self._lock:
            for old in [key for key, until in self._used.items() if until < now]:
                del self._used[old]
            if jti in self._used:
                return False
            self._used[jti] = exp
            return True
