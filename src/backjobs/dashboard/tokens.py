"""Dashboard tokens: HS256 JWTs signed with ``BACKJOBS_JWT_SECRET``, and who is an admin.

A token's ``sub`` is a user id (``"42"``) or an email of the app's ``users`` table; the
bearer is let in while that user's ``is_admin`` is true. ``exp`` is required. Only HS256
is accepted: ``alg: none`` and every other algorithm are refused by PyJWT. Tokens minted
here also carry a ``jti``, which makes a sign-in link usable once (see
:class:`UsedTokenIds`). The app can mint the same tokens with its own JWT library and the
same secret: ``{"sub": "<user id>", "exp": <unix time>}`` is all the gate needs.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


class TokenError(ValueError):
    """A token that is malformed, forged, of another algorithm, expired, or lacks a claim."""


@dataclass(frozen=True)
class AdminClaims:
    sub: str
    exp: int
    jti: str | None


def mint_token(*, sub: str, secret: str, now: datetime, minutes: int) -> str:
    """A signed token for ``sub`` valid ``minutes`` from ``now``, with a fresh ``jti``."""
    claims = {
        "sub": sub,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=minutes)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, *, secret: str) -> AdminClaims:
    """The claims of a valid token; :class:`TokenError` for anything else."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.InvalidTokenError as exc:
        raise TokenError(type(exc).__name__) from None
    jti = claims.get("jti")
    return AdminClaims(sub=str(claims["sub"]), exp=int(claims["exp"]), jti=jti and str(jti))


def find_admin_id(session: Session, *, email: str) -> int:
    """The id of the admin with this email (case-insensitive); LookupError otherwise."""
    user = session.execute(
        select(User.id, User.is_admin).where(func.lower(User.email) == email.strip().lower())
    ).first()
    if user is None:
        raise LookupError(f"no user with email {email!r} in the app database")
    if not user.is_admin:
        raise LookupError(f"user {email!r} is not an admin (users.is_admin is false)")
    return int(user.id)


def mint_admin_token(
    session: Session, *, email: str, secret: str, now: datetime, minutes: int
) -> str:
    """A short-lived dashboard token for the admin with this email (LookupError if none)."""
    return mint_token(
        sub=str(find_admin_id(session, email=email)), secret=secret, now=now, minutes=minutes
    )


def admin_token(email: str, *, settings: Settings, minutes: int | None = None) -> str:
    """A dashboard token for the admin with this email in the configured app database.

    ``sign_in_url(public_url(settings), admin_token(email, settings=settings))`` is the
    one-time sign-in link that ``backjobs dashboard-token EMAIL --url`` prints.
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
            )
    finally:
        engine.dispose()


def sign_in_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}{SIGN_IN_PATH}?{urlencode({'token': token})}"


def user_is_admin(engine: Engine, sub: str) -> bool:
    """Whether ``sub`` (an id or an email) names a user whose ``is_admin`` is true now."""
    if sub.isdigit():
        condition = User.id == int(sub)
    else:
        condition = func.lower(User.email) == sub.lower()
    with engine.connect() as conn:
        return bool(conn.scalar(select(User.is_admin).where(condition)))


class AdminDirectory:
    """Answers "is ``sub`` an admin now?" from the users table, cached ``cache_seconds``.

    Negative answers are cached too, so a promoted or a demoted admin is seen within the
    interval. The lookup runs in a worker thread: the event loop never waits on the DB.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._ttl = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[bool, float]] = {}

    async def is_admin(self, sub: str) -> bool:
        now = self._clock()
        hit = self._cache.get(sub)
        if hit is not None and hit[1] > now:
            return hit[0]
        answer = await anyio.to_thread.run_sync(user_is_admin, self._engine, sub)
        self._cache[sub] = (answer, now + self._ttl)
        return answer


class UsedTokenIds:
    """The ``jti`` of every sign-in link already used, kept in memory until it expires.

    Memory of one process: restarting the dashboard forgets them, which lets an unexpired
    link be used once more; links are short-lived (``--minutes``, default 60) for that.
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
