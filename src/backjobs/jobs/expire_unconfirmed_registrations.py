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

Confirmed, approved and already declined users are never touched. A user whose email
cannot be made — an invalid address, a name or address the outbox cannot store or render
(a NUL, a lone surrogate, not text at all on SQLite) — is logged by id with the field and
counted ``invalid_users``; the batch goes on: not warned (no token), and at expiry
declined without a notice.

Two clocks. ``now`` (the run's ``as_of``) says who is due; the real clock (``wall``, read
per batch) guards the link: a warning whose link would expire before the real time of
queuing (a late run, a replay of an old ``as_of``) is not sent — the user stays
unwarned and the first run at or after the expiry declines them, with the notice.

A warning that can never be delivered — its row failed for good, so its link was scrubbed
— is re-issued (:func:`rearm_undeliverable_warnings`): when that warning's token is still
the user's newest, unused and live, the user is re-armed (``expiry_warning_sent_at``
cleared) and this run sends a fresh link; counted ``warnings_reissued``. Warning rows
record their token's id (``token_id``) for that; ``backjobs outbox retry`` refuses them.

Locks follow :mod:`backjobs.registration`'s order: users first (claimed), then tokens.

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
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import Engine, bindparam, func, insert, select, text, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres, session_scope
from backjobs.db.types import UTCDateTime
from backjobs.mail.render import check_address
from backjobs.models import (
    AppTask,
    EmailConfirmationToken,
    RegistrationStatus,
    TaskStatus,
    TaskType,
    User,
)
from backjobs.outbox import NewEmail, check_email, enqueue_emails
from backjobs.outbox_admin import ended_at
from backjobs.registration import (
    among,
    claim_users,
    confirmation_link,
    hash_token,
    invalidate_tokens,
    new_token,
    user_text,
)
from backjobs.settings import Settings

log = logging.getLogger(__name__)

WARNING_TEMPLATE = "registration_expiry_warning"
EXPIRED_TEMPLATE = "registration_expired"
Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExpireUnconfirmedRegistrationsResult:
    """What a run (or one part) did; ``None``: that part did not report.

    ``invalid_users``: users skipped because no email could be made for them (work left
    undone until their data is fixed). ``warnings_reissued``: users re-armed because their
    warning failed for good (they are also counted in ``warned``).
    """

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("invalid_users",)  # users skipped

    warned: int | None = None
    declined: int | None = None
    declined_unwarned: int | None = None
    warnings_reissued: int = 0
    invalid_users: int = 0
    failed_parts: tuple[str, ...] = ()

    def merge(
        self, other: ExpireUnconfirmedRegistrationsResult
    ) -> ExpireUnconfirmedRegistrationsResult:
        """This result with ``other``'s reported counts laid over it (the others added)."""
        counts = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if f.name in ("warned", "declined", "declined_unwarned")
            and getattr(other, f.name) is not None
        }
        return replace(
            self,
            **counts,
            warnings_reissued=self.warnings_reissued + other.warnings_reissued,
            invalid_users=self.invalid_users + other.invalid_users,
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
        select(
            User.id,
            user_text(session, User.email),
            user_text(session, User.display_name),
            User.created_at,
        )
        .where(User.id > after_id, *_unconfirmed(), *where)
        .order_by(User.id)
        .limit(limit)
    )
    return [Registration._make(row) for row in claim_users(session, query)]


def _emailable(
    rows: list[Registration],
    build: Callable[[Registration], NewEmail],
    *,
    phase: str,
    settings: Settings,
) -> dict[int, NewEmail]:
    """Each row's email, if one can be made; the others logged by user id (never a value)."""
    emails = {}
    for row in rows:
        try:
            check_address(row.email)
        except ValueError:
            log.warning("user %s has an invalid email address; no %s email", row.id, phase)
            continue
        email = build(row)
        try:
            check_email(email, settings=settings)
        except ValueError as exc:
            log.warning("user %s cannot be emailed (%s); no %s email", row.id, exc, phase)
            continue
        emails[row.id] = email
    return emails


def warn_batch(
    session: Session, *, after_id: int, now: datetime, at: datetime, settings: Settings, limit: int
) -> _Batch:
    """Warn one keyset batch of expiring registrations in the caller's transaction.

    ``at`` is the real time: a registration expiring by then would get a dead link.
    """
    lifetime = timedelta(days=settings.registration_confirmation_days)
    window = timedelta(days=settings.registration_expiry_warning_days)
    rows = _claim(
        session,
        [
            User.created_at > now - lifetime,  # not expired yet
            User.created_at <= now - lifetime + window,  # expires within the window
            User.created_at > at - lifetime,  # the link outlives the real time of queuing
            User.expiry_warning_sent_at.is_(None),
        ],
        after_id=after_id,
        limit=limit,
    )
    batch = _Batch(scanned=len(rows), last_id=rows[-1].id if rows else after_id)
    tokens = {r.id: new_token() for r in rows}
    emails = _emailable(
        rows,
        lambda r: NewEmail(r.email, WARNING_TEMPLATE, {
            "display_name": r.display_name,
            "confirmation_link": confirmation_link(tokens[r.id], settings),
            "expires_at": r.created_at + lifetime,
        }),
        phase="expiry warning",
        settings=settings,
    )  # fmt: skip
    invalid = len(rows) - len(emails)
    if not emails:
        return replace(batch, invalid=invalid)
    warned = set(
        session.scalars(
            update(User)
            .where(among(session, User.id, list(emails)))
            .where(User.expiry_warning_sent_at.is_(None))
            .where(*_unconfirmed())
            .values(expiry_warning_sent_at=now)
            .returning(User.id)
            .execution_options(synchronize_session=False)
        )
    )
    todo = [r for r in rows if r.id in warned]
    if not todo:
        return replace(batch, invalid=invalid)
    invalidate_tokens(session, [r.id for r in todo], now=now)
    token_ids = _insert_tokens(
        session,
        [(r.id, hash_token(tokens[r.id]), r.created_at + lifetime) for r in todo],
        now=now,
    )
    sent = [
        emails[r.id]._replace(context={**emails[r.id].context, "token_id": token_ids[r.id]})
        for r in todo
    ]
    enqueue_emails(session, sent, now=now, settings=settings)
    return replace(batch, done=len(todo), invalid=invalid)


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


def decline_batch(
    session: Session, *, after_id: int, now: datetime, at: datetime, settings: Settings, limit: int
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
            .where(among(session, User.id, [r.id for r in rows]), *_unconfirmed())
            .values(registration_status=RegistrationStatus.DECLINED.value)
            .returning(User.id, User.expiry_warning_sent_at)
            .execution_options(synchronize_session=False)
        )
    }
    todo = [r for r in rows if r.id in declined]
    if not todo:
        return batch
    invalidate_tokens(session, [r.id for r in todo], now=now)
    emails = _emailable(
        todo,
        lambda r: NewEmail(r.email, EXPIRED_TEMPLATE, {
            "display_name": r.display_name,
            "expired_at": r.created_at + lifetime,
            "register_url": settings.app_base_url,
        }),
        phase="expiry notice",
        settings=settings,
    )  # fmt: skip
    enqueue_emails(session, list(emails.values()), now=now, settings=settings)
    unwarned = sum(1 for r in todo if declined[r.id] is None)
    return replace(batch, done=len(todo), unwarned=unwarned, invalid=len(todo) - len(emails))


BatchFn = Callable[..., _Batch]


def _run_batches(
    engine: Engine, step: BatchFn, *, now: datetime, settings: Settings, wall: Clock
) -> _Batch:
    total = _Batch(scanned=0, last_id=0)
    limit = settings.registration_batch_size
    while True:
        try:
            with session_scope(engine) as session:
                batch = step(
                    session,
                    after_id=total.last_id,
                    now=now,
                    at=wall(),
                    settings=settings,
                    limit=limit,
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


def rearm_undeliverable_warnings(
    session: Session, *, now: datetime, at: datetime, settings: Settings
) -> int:
    """Re-arm users whose warning failed for good (its link scrubbed); return how many.

    Only when the failed warning's token is still the user's newest, unused and live at
    both clocks, and the user still pending and unconfirmed: a warning re-issued since, a
    click, a decline or the expiry each end it. Failed rows older than the warning window
    cannot belong to a registration still open, so only those since are read.
    """
    window = timedelta(days=settings.registration_expiry_warning_days)
    failed = session.scalars(
        select(AppTask.payload).where(
            AppTask.task_type == TaskType.EMAIL_SEND.value,
            AppTask.status == TaskStatus.FAILED.value,
            ended_at() >= min(now, at) - window,
        )
    )
    token_ids = sorted({t for payload in failed if (t := _scrubbed_warning_token(payload))})
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
        .where(User.id.in_(lost), among(session, newest, token_ids), *_unconfirmed())
        .where(User.expiry_warning_sent_at.is_not(None))
        .values(expiry_warning_sent_at=None)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    ).all()
    for user_id in rearmed:
        log.warning("user %s: the expiry warning failed for good; a fresh link is sent", user_id)
    return len(rearmed)


def _scrubbed_warning_token(payload: Any) -> int | None:
    if not isinstance(payload, dict) or payload.get("template") != WARNING_TEMPLATE:
        return None
    context = payload.get("context")
    if not isinstance(context, dict) or context.get("confirmation_link") is not None:
        return None  # the link is still there: ops can retry the row itself
    token_id = context.get("token_id")
    return token_id if isinstance(token_id, int) and not isinstance(token_id, bool) else None


def warn_expiring_registrations(
    engine: Engine, *, now: datetime, settings: Settings, wall: Clock = wall_clock
) -> ExpireUnconfirmedRegistrationsResult:
    """Send a fresh confirmation link to every registration expiring within the window."""
    with session_scope(engine) as session:
        reissued = rearm_undeliverable_warnings(session, now=now, at=wall(), settings=settings)
    total = _run_batches(engine, warn_batch, now=now, settings=settings, wall=wall)
    log.info("Warned %d unconfirmed registration(s) of their expiry", total.done)
    return ExpireUnconfirmedRegistrationsResult(
        warned=total.done, warnings_reissued=reissued, invalid_users=total.invalid
    )


def decline_expired_registrations(
    engine: Engine, *, now: datetime, settings: Settings, wall: Clock = wall_clock
) -> ExpireUnconfirmedRegistrationsResult:
    """Decline every expired unconfirmed registration and queue its notice."""
    total = _run_batches(engine, decline_batch, now=now, settings=settings, wall=wall)
    log.info("Declined %d expired registration(s), %d never warned", total.done, total.unwarned)
    return ExpireUnconfirmedRegistrationsResult(
        declined=total.done, declined_unwarned=total.unwarned, invalid_users=total.invalid
    )
