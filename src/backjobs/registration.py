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
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backjobs.db import is_postgres
from backjobs.models import EmailConfirmationToken, User
from backjobs.settings import Settings


class Refusal(StrEnum):
    """Why a presented confirmation token was refused."""

    UNKNOWN = "unknown"
    EXPIRED = "expired"
    USED = "used"


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


def confirm_email(session: Session, *, token: str, now: datetime) -> Confirmed:
    """Confirm the email address of the user the token was sent to, at ``now``.

    Marks the token used and sets ``users.email_confirmed_at`` (kept if already set); the
    user's other unused tokens are invalidated. Raises :class:`ConfirmationRefused` with
    reason ``unknown``, ``expired`` (also: superseded by a newer token, or the registration
    expired) or ``used``. Runs in the caller's transaction (flushes, never commits).
    """
    digest = hash_token(token)
    query = select(EmailConfirmationToken).where(EmailConfirmationToken.token_hash == digest)
    if is_postgres(session):
        query = query.with_for_update()  # two clicks at once: one confirms, one sees "used"
    row = session.scalars(query).one_or_none()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise ConfirmationRefused(Refusal.UNKNOWN)
    if row.used_at is not None:
        raise ConfirmationRefused(Refusal.USED)
    if row.expires_at <= now:
        raise ConfirmationRefused(Refusal.EXPIRED)
    row.used_at = now
    user = session.get_one(User, row.user_id)
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
