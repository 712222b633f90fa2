"""ExpireUnconfirmedRegistrationsJob's domain: warn, then decline, unconfirmed registrations.

A ``pending`` registration whose email is not confirmed expires
``BACKJOBS_REGISTRATION_CONFIRMATION_DAYS`` after ``created_at``. Two independent parts:

- :func:`warn_expiring_registrations` — expiry after ``now`` and at most
  ``BACKJOBS_REGISTRATION_EXPIRY_WARNING_DAYS`` away, ``expiry_warning_sent_at`` null: a new
  confirmation token (only its sha256 stored, valid until the registration's expiry), the
  user's older unused tokens invalidated (``expires_at = now``), the
  ``registration_expiry_warning`` email with the link, ``expiry_warning_sent_at = now``.
- :func:`decline_expired_registrations` — expiry at or before ``now``: ``declined``, unused
  tokens invalidated, the ``registration_expired`` notice. A user past expiry who was never
  warned (the job did not run in the window, or it was shorter than a day) is declined
  directly, with the notice only; the result counts them ``declined_unwarned``.

Confirmed, approved and already declined users are never touched. A user whose address
is invalid is logged by id and counted ``invalid_addresses``: not warned (no token), and
at expiry declined without a notice.

Both work in keyset batches by id of ``BACKJOBS_REGISTRATION_BATCH_SIZE`` users, **each
batch its own transaction** (state change, tokens and emails together; these functions
commit: batching is the point). On PostgreSQL a batch is claimed ``FOR UPDATE SKIP
LOCKED`` and every update is guarded by its "not yet" condition, so two runs at once warn
and decline each user once; SQLite serialises writers (``BEGIN IMMEDIATE``). Memory stays
flat: one batch at a time. A batch's emails go into the outbox in one multi-row INSERT
(:func:`backjobs.outbox.enqueue_emails`, validated as ``enqueue_email`` does). The raw
token lives only in the queued email.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import BigInteger, Engine, any_, bindparam, insert, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres, session_scope
from backjobs.db.types import UTCDateTime
from backjobs.mail.render import check_address
from backjobs.models import EmailConfirmationToken, RegistrationStatus, User
from backjobs.outbox import NewEmail, enqueue_emails
from backjobs.registration import confirmation_link, hash_token, new_token
from backjobs.settings import Settings

log = logging.getLogger(__name__)

WARNING_TEMPLATE = "registration_expiry_warning"
EXPIRED_TEMPLATE = "registration_expired"


@dataclass(frozen=True)
class ExpireUnconfirmedRegistrationsResult:
    """What a run (or one part) did; ``None``: that part did not report."""

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("invalid_addresses",)  # users skipped

    warned: int | None = None
    declined: int | None = None
    declined_unwarned: int | None = None
    invalid_addresses: int = 0
    failed_parts: tuple[str, ...] = ()

    def merge(
        self, other: ExpireUnconfirmedRegistrationsResult
    ) -> ExpireUnconfirmedRegistrationsResult:
        """This result with ``other``'s reported counts laid over it (addresses added)."""
        counts = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if f.name in ("warned", "declined", "declined_unwarned")
            and getattr(other, f.name) is not None
        }
        return replace(
            self,
            **counts,
            invalid_addresses=self.invalid_addresses + other.invalid_addresses,
            failed_parts=self.failed_parts + other.failed_parts,
        )


class Registration(NamedTuple):
    id: int
    email: str
    display_name: str | None
    created_at: datetime


@dataclass(frozen=True)
class _Batch:
    scanned: int
    last_id: int
    done: int = 0
    unwarned: int = 0
    invalid: int = 0


def _unconfirmed() -> list[ColumnElement[bool]]:
    return [
        User.registration_status == RegistrationStatus.PENDING.value,
        User.email_confirmed_at.is_(None),
    ]


def _claim(
    session: Session, where: list[ColumnElement[bool]], *, after_id: int, limit: int
) -> list[Registration]:
    query = (
        select(User.id, User.email, User.display_name, User.created_at)
        .where(User.id > after_id, *_unconfirmed(), *where)
        .order_by(User.id)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=User)  # another run has these
    return [Registration._make(row) for row in session.execute(query)]


def _valid(rows: list[Registration], phase: str) -> tuple[list[Registration], int]:
    valid = []
    for row in rows:
        try:
            check_address(row.email)
        except ValueError:
            log.warning("user %s has an invalid email address; no %s email", row.id, phase)
            continue
        valid.append(row)
    return valid, len(rows) - len(valid)


def _among(session: Session, column: Any, ids: list[int]) -> ColumnElement[bool]:
    # PostgreSQL: one array parameter instead of a thousand placeholders.
    if is_postgres(session):
        return column == any_(bindparam(None, ids, type_=ARRAY(BigInteger)))  # type: ignore[no-any-return]
    return column.in_(ids)  # type: ignore[no-any-return]


def _invalidate_tokens(session: Session, user_ids: list[int], *, now: datetime) -> None:
    session.execute(
        update(EmailConfirmationToken)
        .where(
            _among(session, EmailConfirmationToken.user_id, user_ids),
            EmailConfirmationToken.used_at.is_(None),
            EmailConfirmationToken.expires_at > now,
        )
        .values(expires_at=now)
        .execution_options(synchronize_session=False)
    )


def warn_batch(
    session: Session, *, after_id: int, now: datetime, settings: Settings, limit: int
) -> _Batch:
    """Warn one keyset batch of expiring registrations in the caller's transaction."""
    lifetime = timedelta(days=settings.registration_confirmation_days)
    window = timedelta(days=settings.registration_expiry_warning_days)
    rows = _claim(
        session,
        [
            User.created_at > now - lifetime,  # not expired yet
            User.created_at <= now - lifetime + window,  # expires within the window
            User.expiry_warning_sent_at.is_(None),
        ],
        after_id=after_id,
        limit=limit,
    )
    batch = _Batch(scanned=len(rows), last_id=rows[-1].id if rows else after_id)
    valid, invalid = _valid(rows, "expiry warning")
    if not valid:
        return replace(batch, invalid=invalid)
    warned = set(
        session.scalars(
            update(User)
            .where(_among(session, User.id, [r.id for r in valid]))
            .where(User.expiry_warning_sent_at.is_(None))
            .where(*_unconfirmed())
            .values(expiry_warning_sent_at=now)
            .returning(User.id)
            .execution_options(synchronize_session=False)
        )
    )
    todo = [r for r in valid if r.id in warned]
    if not todo:
        return replace(batch, invalid=invalid)
    _invalidate_tokens(session, [r.id for r in todo], now=now)
    tokens = {r.id: new_token() for r in todo}
    _insert_tokens(
        session,
        [(r.id, hash_token(tokens[r.id]), r.created_at + lifetime) for r in todo],
        now=now,
    )
    emails = [
        NewEmail(r.email, WARNING_TEMPLATE, {
            "display_name": r.display_name,
            "confirmation_link": confirmation_link(tokens[r.id], settings),
            "expires_at": r.created_at + lifetime,
        })
        for r in todo
    ]  # fmt: skip
    enqueue_emails(session, emails, now=now, settings=settings)
    return replace(batch, done=len(todo), invalid=invalid)


# PostgreSQL: the rows as one JSON parameter (psycopg converts thousands of placeholders
# slower than PostgreSQL inserts the rows).
_PG_INSERT_TOKENS = text("""
    INSERT INTO email_confirmation_tokens (user_id, token_hash, expires_at, created_at)
    SELECT t.user_id, t.token_hash, t.expires_at, :now
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS t(user_id bigint, token_hash text, expires_at timestamptz)
""").bindparams(bindparam("now", type_=UTCDateTime()))


def _insert_tokens(
    session: Session, rows: list[tuple[int, str, datetime]], *, now: datetime
) -> None:
    if is_postgres(session):
        data = [{"user_id": u, "token_hash": h, "expires_at": e.isoformat()} for u, h, e in rows]
        session.execute(_PG_INSERT_TOKENS, {"rows": json.dumps(data), "now": now})
        return
    values = [
        {"user_id": u, "token_hash": h, "expires_at": e, "created_at": now} for u, h, e in rows
    ]
    session.execute(insert(EmailConfirmationToken), values)


def decline_batch(
    session: Session, *, after_id: int, now: datetime, settings: Settings, limit: int
) -> _Batch:
    """Decline one keyset batch of expired registrations in the caller's transaction."""
    lifetime = timedelta(days=settings.registration_confirmation_days)
    rows = _claim(session, [User.created_at <= now - lifetime], after_id=after_id, limit=limit)
    batch = _Batch(scanned=len(rows), last_id=rows[-1].id if rows else after_id)
    if not rows:
        return batch
    declined = {
        user_id: warned_at
        for user_id, warned_at in session.execute(
            update(User)
            .where(_among(session, User.id, [r.id for r in rows]), *_unconfirmed())
            .values(registration_status=RegistrationStatus.DECLINED.value)
            .returning(User.id, User.expiry_warning_sent_at)
            .execution_options(synchronize_session=False)
        )
    }
    todo = [r for r in rows if r.id in declined]
    if not todo:
        return batch
    _invalidate_tokens(session, [r.id for r in todo], now=now)
    valid, invalid = _valid(todo, "expiry notice")
    emails = [
        NewEmail(r.email, EXPIRED_TEMPLATE, {
            "display_name": r.display_name,
            "expired_at": r.created_at + lifetime,
            "register_url": settings.app_base_url,
        })
        for r in valid
    ]  # fmt: skip
    enqueue_emails(session, emails, now=now, settings=settings)
    unwarned = sum(1 for r in todo if declined[r.id] is None)
    return replace(batch, done=len(todo), unwarned=unwarned, invalid=invalid)


BatchFn = Callable[..., _Batch]


def _run_batches(engine: Engine, step: BatchFn, *, now: datetime, settings: Settings) -> _Batch:
    total = _Batch(scanned=0, last_id=0)
    limit = settings.registration_batch_size
    while True:
        try:
            with session_scope(engine) as session:
                batch = step(
                    session, after_id=total.last_id, now=now, settings=settings, limit=limit
                )
        except StatementError as exc:
            # Its parameters hold confirmation links: keep them out of logs and run states.
            exc.hide_parameters, exc.params = True, None
            raise
        total = _Batch(
            scanned=total.scanned + batch.scanned,
            last_id=batch.last_id,
            done=total.done + batch.done,
            unwarned=total.unwarned + batch.unwarned,
            invalid=total.invalid + batch.invalid,
        )
        if batch.scanned < limit:
            return total


def warn_expiring_registrations(
    engine: Engine, *, now: datetime, settings: Settings
) -> ExpireUnconfirmedRegistrationsResult:
    """Send a fresh confirmation link to every registration expiring within the window."""
    total = _run_batches(engine, warn_batch, now=now, settings=settings)
    log.info("Warned %d unconfirmed registration(s) of their expiry", total.done)
    return ExpireUnconfirmedRegistrationsResult(warned=total.done, invalid_addresses=total.invalid)


def decline_expired_registrations(
    engine: Engine, *, now: datetime, settings: Settings
) -> ExpireUnconfirmedRegistrationsResult:
    """Decline every expired unconfirmed registration and queue its notice."""
    total = _run_batches(engine, decline_batch, now=now, settings=settings)
    log.info("Declined %d expired registration(s), %d never warned", total.done, total.unwarned)
    return ExpireUnconfirmedRegistrationsResult(
        declined=total.done, declined_unwarned=total.unwarned, invalid_addresses=total.invalid
    )
