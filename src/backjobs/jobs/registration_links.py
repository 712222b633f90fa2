"""The confirmation links ExpireUnconfirmedRegistrationsJob's warnings carry: issued, and
issued again when a warning can never be delivered.

:func:`issue_links` stores one new token per user (only its sha256) and supersedes the
user's older unused tokens (``expires_at = now``), in the caller's transaction, with the
users already claimed (:mod:`backjobs.registration`'s lock order: users, then tokens). It
returns each user's new token id, which the warning's outbox row records (``token_id``).

:func:`rearm_undeliverable_warnings` finds the users whose warning failed for good — its
row's link was scrubbed when it ended, so ``backjobs outbox retry`` refuses it — and
re-arms them (``expiry_warning_sent_at`` cleared) when that warning's token is still the
user's newest, unused and live, and the user still pending and unconfirmed; the warning
part then sends them a fresh link. Warning rows queued before ``token_id`` existed cannot
be matched to a token and are never re-armed.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres
from backjobs.db.types import UTCDateTime
from backjobs.models import (
    AppTask,
    EmailConfirmationToken,
    RegistrationStatus,
    TaskStatus,
    TaskType,
    User,
)
from backjobs.outbox_admin import ended_at
from backjobs.registration import among, hash_token, invalidate_tokens
from backjobs.settings import Settings

log = logging.getLogger(__name__)

WARNING_TEMPLATE = "registration_expiry_warning"


class NewLink(NamedTuple):
    """A link to issue: the raw token goes into the email, only its hash is stored."""

    user_id: int
    token: str
    expires_at: datetime


def unconfirmed() -> list[ColumnElement[bool]]:
    """A registration still open: pending, its email not confirmed."""
    return [
        User.registration_status == RegistrationStatus.PENDING.value,
        User.email_confirmed_at.is_(None),
    ]


def issue_links(session: Session, links: list[NewLink], *, now: datetime) -> dict[int, int]:
    """Supersede each user's unused tokens and store the new ones; each user's token id.

    The users must be claimed (locked) by the caller first.
    """
    invalidate_tokens(session, [link.user_id for link in links], now=now)
    rows = [(link.user_id, hash_token(link.token), link.expires_at) for link in links]
    return _insert_tokens(session, rows, now=now)


# PostgreSQL: the rows as one JSON parameter (psycopg converts thousands of placeholders
# slower than PostgreSQL inserts the rows).
_PG_INSERT_TOKENS = text("""
    INSERT INTO email_confirmation_tokens (user_id, token_hash, expires_at, created_at)
    SELECT t.user_id, t.token_hash, t.expires_at, :now
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS t(user_id bigint, token_hash text, expires_at timestamptz)
    RETURNING user_id, id
""").bindparams(bindparam("now", type_=UTCDateTime()))


def _insert_tokens(
    session: Session, rows: list[tuple[int, str, datetime]], *, now: datetime
) -> dict[int, int]:
    """Insert one token per user; return each user's new token id."""
    if is_postgres(session):
        data = [{"user_id": u, "token_hash": h, "expires_at": e.isoformat()} for u, h, e in rows]
        inserted = session.execute(_PG_INSERT_TOKENS, {"rows": json.dumps(data), "now": now})
        return {int(user_id): int(token_id) for user_id, token_id in inserted}
    values = [
        {"user_id": u, "token_hash": h, "expires_at": e, "created_at": now} for u, h, e in rows
    ]
    statement = insert(EmailConfirmationToken).returning(
        EmailConfirmationToken.user_id, EmailConfirmationToken.id, sort_by_parameter_order=True
    )
    return {int(user_id): int(token_id) for user_id, token_id in session.execute(statement, values)}


def rearm_undeliverable_warnings(
    session: Session, *, now: datetime, at: datetime, settings: Settings
) -> int:
    """Re-arm users whose warning failed for good (its link scrubbed); return how many.

    Only when the failed warning's token is still the user's newest, unused and live at
    both clocks, and the user still pending and unconfirmed: a warning re-issued since, a
    click, a decline or the expiry each end it. Failed rows older than the warning window
    cannot belong to a registration still open, so only those since are read.
    """
    token_ids = _undeliverable_warning_tokens(session, since=min(now, at), settings=settings)
    if not token_ids:
        return 0
    token = EmailConfirmationToken
    newest = select(func.max(token.id)).where(token.user_id == User.id).scalar_subquery()
    lost = select(token.user_id).where(
        among(session, token.id, token_ids),
        token.used_at.is_(None),
        token.expires_at > now,
        token.expires_at > at,
    )
    rearmed = session.scalars(
        update(User)
        .where(User.id.in_(lost), among(session, newest, token_ids), *unconfirmed())
        .where(User.expiry_warning_sent_at.is_not(None))
        .values(expiry_warning_sent_at=None)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    ).all()
    for user_id in rearmed:
        log.warning("user %s: the expiry warning failed for good; a fresh link is sent", user_id)
    return len(rearmed)


def _undeliverable_warning_tokens(
    session: Session, *, since: datetime, settings: Settings
) -> list[int]:
    """The token ids of warning rows failed for good within the warning window."""
    window = timedelta(days=settings.registration_expiry_warning_days)
    failed = session.scalars(
        select(AppTask.payload).where(
            AppTask.task_type == TaskType.EMAIL_SEND.value,
            AppTask.status == TaskStatus.FAILED.value,
            ended_at() >= since - window,
        )
    )
    return sorted({t for payload in failed if (t := _scrubbed_warning_token(payload))})


def _scrubbed_warning_token(payload: Any) -> int | None:
    if not isinstance(payload, dict) or payload.get("template") != WARNING_TEMPLATE:
        return None
    context = payload.get("context")
    if not isinstance(context, dict) or context.get("confirmation_link") is not None:
        return None  # the link is still there: ops can retry the row itself
    token_id = context.get("token_id")
    return token_id if isinstance(token_id, int) and not isinstance(token_id, bool) else None
