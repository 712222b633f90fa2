"""Email-confirmation tokens: made by ExpireUnconfirmedRegistrationsJob, checked by the app.

A token is ``secrets.token_urlsafe(32)`` (256 random bits). Only its sha256 (hex) is stored
in ``email_confirmation_tokens``; the raw token exists only inside the queued email, whose
payload field is marked sensitive and cleared once the outbox row ends.

:func:`confirm_email` is what the app calls when a user follows the link. It hashes the
presented token and looks the row up *by hash*. That is constant-time with respect to the
secret: whatever timing the index lookup or a string comparison leaks is about the
sha256 of the presented value, and learning which hashes are near a stored one tells an
attacker nothing about the token (finding a preimage of a chosen hash is infeasible);
``hmac.compare_digest`` then confirms the match without early exit anyway. The token
itself never appears in a log line or an exception message.

Invalidated tokens (a newer one was sent, or the registration expired) get
``expires_at = now``: they are refused as expired, and ``used_at`` keeps meaning "used".

**Lock order** — one for every writer of a registration, the jobs and the app alike: the
``users`` row first, then its ``email_confirmation_tokens``. :func:`lock_user` (one user,
the app's side) and :func:`claim_users` (a job's batch) take the first lock;
:func:`invalidate_tokens` and the token writes come after, with the users held. Anyone
taking them the other way round (a token, then its user) deadlocks against a job's batch on
PostgreSQL. On SQLite a writer holds the whole database (``BEGIN IMMEDIATE``, as
:mod:`backjobs.db`'s engines begin every transaction): the order holds trivially, and a
session that began its transaction otherwise may get ``database is locked`` instead.

The user row is the one truth about a registration: a declined user (by
ExpireUnconfirmedRegistrationsJob or by an admin) is never confirmed, whatever the token
says, so a click racing the decline ends one way or the other — confirmed, and the decline
skips the user; or refused as ``declined``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVarTuple

from sqlalchemy import (
    BigInteger,
    Dialect,
    LargeBinary,
    Select,
    TypeDecorator,
    any_,
    bindparam,
    cast,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres
from backjobs.models import EmailConfirmationToken, RegistrationStatus, User
from backjobs.settings import Settings

_Columns = TypeVarTuple("_Columns")


class Refusal(StrEnum):
    """Why a presented confirmation token was refused."""

    UNKNOWN = "unknown"
    EXPIRED = "expired"
    USED = "used"
    DECLINED = "declined"


class ConfirmationRefused(ValueError):
    """A confirmation token that cannot confirm anything; ``reason`` says why."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(f"email confirmation token refused: {reason.value}")
        self.reason = reason


@dataclass(frozen=True)
class Confirmed:
    user_id: int
    email_confirmed_at: datetime


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def confirmation_link(token: str, settings: Settings) -> str:
    """``BACKJOBS_APP_BASE_URL`` + ``BACKJOBS_CONFIRMATION_PATH`` + the token, as is."""
    return f"{settings.app_base_url.rstrip('/')}{settings.confirmation_path}{token}"


def among(session: Session, column: Any, ids: list[int]) -> ColumnElement[bool]:
    """``column`` is one of ``ids`` (PostgreSQL: one array parameter, not a thousand)."""
    if is_postgres(session):
        return column == any_(bindparam(None, ids, type_=ARRAY(BigInteger)))  # type: ignore[no-any-return]
    return column.in_(ids)  # type: ignore[no-any-return]


class _LenientText(TypeDecorator[str]):
    """Bytes read back as text whatever they hold: undecodable bytes become lone
    surrogates (``surrogateescape``), which the outbox's checks then name and refuse."""

    impl = LargeBinary
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return bytes(value).decode("utf-8", "surrogateescape")


def user_text(session: Session, column: Any) -> Any:
    """``column`` (a user's email or name) in a form that always reads.

    SQLite columns take any bytes; one that is not UTF-8 would fail the whole batch's
    fetch (``Could not decode to UTF-8``). Read as bytes and decoded leniently, the bad
    row reaches the job's per-row checks, which skip it by id. PostgreSQL: as it is.
    """
    if is_postgres(session):
        return column
    return type_coerce(cast(column, LargeBinary), _LenientText()).label(column.key)


def lock_user(session: Session, user_id: int) -> User | None:
    """The user, locked (first in the lock order) and read afresh; None when gone."""
    query = select(User).where(User.id == user_id).execution_options(populate_existing=True)
    if is_postgres(session):
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def claim_users(session: Session, query: Select[*_Columns]) -> list[Row[*_Columns]]:
    """A job's batch of ``users`` rows, locked first in the lock order; rows another
    transaction holds (a click being confirmed, another run) are skipped, not waited for."""
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=User)
    return list(session.execute(query))


def invalidate_tokens(session: Session, user_ids: list[int], *, now: datetime) -> None:
    """Expire the users' unused tokens at ``now``; the users must be locked already."""
    session.execute(
        update(EmailConfirmationToken)
        .where(
            among(session, EmailConfirmationToken.user_id, user_ids),
            EmailConfirmationToken.used_at.is_(None),
            EmailConfirmationToken.expires_at > now,
        )
        .values(expires_at=now)
        .execution_options(synchronize_session=False)
    )


def confirm_email(session: Session, *, token: str, now: datetime) -> Confirmed:
    """Confirm the email address of the user the token was sent to, at ``now``.

    Marks the token used and sets ``users.email_confirmed_at`` (kept if already set); the
    user's other unused tokens are invalidated. Raises :class:`ConfirmationRefused` with
    reason ``unknown``, ``declined`` (the registration was declined, by the expiry job or
    an admin), ``used`` or ``expired`` (also: superseded by a newer token, or the
    registration expired). Takes the user's lock, then the token's (the module's lock
    order), so it waits for a job's batch holding the user instead of deadlocking with it.
    Runs in the caller's transaction (flushes, never commits).
    """
    digest = hash_token(token)
    found = session.execute(
        select(EmailConfirmationToken.id, EmailConfirmationToken.user_id).where(
            EmailConfirmationToken.token_hash == digest
        )
    ).one_or_none()
    if found is None:
        raise ConfirmationRefused(Refusal.UNKNOWN)
    user = lock_user(session, found.user_id)
    query = (
        select(EmailConfirmationToken)
        .where(EmailConfirmationToken.id == found.id)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):
        query = query.with_for_update()  # two clicks at once: one confirms, one sees "used"
    row = session.scalars(query).one_or_none()
    if user is None or row is None or not hmac.compare_digest(row.token_hash, digest):
        raise ConfirmationRefused(Refusal.UNKNOWN)
    if user.registration_status == RegistrationStatus.DECLINED.value:
        raise ConfirmationRefused(Refusal.DECLINED)
    if row.used_at is not None:
        raise ConfirmationRefused(Refusal.USED)
    if row.expires_at <= now:
        raise ConfirmationRefused(Refusal.EXPIRED)
    row.used_at = now
    if user.email_confirmed_at is None:
        user.email_confirmed_at = now
    session.execute(
        update(EmailConfirmationToken)
        .where(
            EmailConfirmationToken.user_id == row.user_id,
            EmailConfirmationToken.id != row.id,
            EmailConfirmationToken.used_at.is_(None),
            EmailConfirmationToken.expires_at > now,
        )
        .values(expires_at=now)
    )
    session.flush()
    return Confirmed(user_id=user.id, email_confirmed_at=user.email_confirmed_at)
