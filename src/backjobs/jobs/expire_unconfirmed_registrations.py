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
— is re-issued: the warning part first re-arms such users
(:func:`~backjobs.jobs.registration_links.rearm_undeliverable_warnings`), then warns them
with a fresh link; counted ``warnings_reissued``. Tokens are issued, and lost warnings
found, in :mod:`backjobs.jobs.registration_links`.

Locks follow :mod:`backjobs.registration`'s order: users first (claimed), then tokens.

Both work in keyset batches by id of ``BACKJOBS_REGISTRATION_BATCH_SIZE`` users, **each
batch its own transaction** (:mod:`backjobs.jobs.registration_batches`: state change,
tokens and emails together; these functions commit: batching is the point). On PostgreSQL
a batch is claimed ``FOR UPDATE SKIP LOCKED`` and every update is guarded by its "not
yet" condition, so two runs at once warn and decline each user once; SQLite serialises
writers (``BEGIN IMMEDIATE``). Memory stays flat: one batch at a time. A batch's emails
go into the outbox in one multi-row INSERT (:func:`backjobs.outbox.enqueue_emails`,
validated as ``enqueue_email`` does). The raw
token lives only in the queued email.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import ClassVar, NamedTuple

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import session_scope
from backjobs.jobs.registration_batches import Batch, Clock, run_batches, wall_clock
from backjobs.jobs.registration_links import (
    WARNING_TEMPLATE,
    NewLink,
    issue_links,
    rearm_undeliverable_warnings,
    unconfirmed,
)
from backjobs.mail.render import check_address
from backjobs.models import RegistrationStatus, User
from backjobs.outbox import NewEmail, check_email, enqueue_emails
from backjobs.registration import (
    among,
    claim_users,
    confirmation_link,
    invalidate_tokens,
    new_token,
    user_text,
)
from backjobs.settings import Settings

log = logging.getLogger(__name__)

EXPIRED_TEMPLATE = "registration_expired"


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
        .where(User.id > after_id, *unconfirmed(), *where)
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


def _claim_expiring(
    session: Session, *, after_id: int, now: datetime, at: datetime, settings: Settings, limit: int
) -> list[Registration]:
    lifetime = timedelta(days=settings.registration_confirmation_days)
    window = timedelta(days=settings.registration_expiry_warning_days)
    where = [
        User.created_at > now - lifetime,  # not expired yet
        User.created_at <= now - lifetime + window,  # expires within the window
        User.created_at > at - lifetime,  # the link outlives the real time of queuing
        User.expiry_warning_sent_at.is_(None),
    ]
    return _claim(session, where, after_id=after_id, limit=limit)


def _mark_warned(session: Session, user_ids: list[int], *, now: datetime) -> set[int]:
    """Mark those still unwarned and open as warned at ``now``; the ids marked."""
    return set(
        session.scalars(
            update(User)
            .where(among(session, User.id, user_ids), *unconfirmed())
            .where(User.expiry_warning_sent_at.is_(None))
            .values(expiry_warning_sent_at=now)
            .returning(User.id)
            .execution_options(synchronize_session=False)
        )
    )


def warn_batch(
    session: Session, *, after_id: int, now: datetime, at: datetime, settings: Settings, limit: int
) -> Batch:
    """Warn one keyset batch of expiring registrations in the caller's transaction.

    ``at`` is the real time: a registration expiring by then would get a dead link.
    """
    lifetime = timedelta(days=settings.registration_confirmation_days)
    rows = _claim_expiring(
        session, after_id=after_id, now=now, at=at, settings=settings, limit=limit
    )
    batch = Batch(scanned=len(rows), last_id=rows[-1].id if rows else after_id)
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
    warned = _mark_warned(session, list(emails), now=now)
    todo = [r for r in rows if r.id in warned]
    if not todo:
        return replace(batch, invalid=invalid)
    token_ids = issue_links(
        session, [NewLink(r.id, tokens[r.id], r.created_at + lifetime) for r in todo], now=now
    )
    sent = [
        emails[r.id]._replace(context={**emails[r.id].context, "token_id": token_ids[r.id]})
        for r in todo
    ]
    enqueue_emails(session, sent, now=now, settings=settings)
    return replace(batch, done=len(todo), invalid=invalid)


def decline_batch(
    session: Session, *, after_id: int, now: datetime, at: datetime, settings: Settings, limit: int
) -> Batch:
    """Decline one keyset batch of expired registrations in the caller's transaction."""
    lifetime = timedelta(days=settings.registration_confirmation_days)
    rows = _claim(session, [User.created_at <= now - lifetime], after_id=after_id, limit=limit)
    batch = Batch(scanned=len(rows), last_id=rows[-1].id if rows else after_id)
    if not rows:
        return batch
    declined = {
        user_id: warned_at
        for user_id, warned_at in session.execute(
            update(User)
            .where(among(session, User.id, [r.id for r in rows]), *unconfirmed())
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


def warn_expiring_registrations(
    engine: Engine, *, now: datetime, settings: Settings, wall: Clock = wall_clock
) -> ExpireUnconfirmedRegistrationsResult:
    """Send a fresh confirmation link to every registration expiring within the window."""
    with session_scope(engine) as session:
        reissued = rearm_undeliverable_warnings(session, now=now, at=wall(), settings=settings)
    total = run_batches(engine, warn_batch, now=now, settings=settings, wall=wall)
    log.info("Warned %d unconfirmed registration(s) of their expiry", total.done)
    return ExpireUnconfirmedRegistrationsResult(
        warned=total.done, warnings_reissued=reissued, invalid_users=total.invalid
    )


def decline_expired_registrations(
    engine: Engine, *, now: datetime, settings: Settings, wall: Clock = wall_clock
) -> ExpireUnconfirmedRegistrationsResult:
    """Decline every expired unconfirmed registration and queue its notice."""
    total = run_batches(engine, decline_batch, now=now, settings=settings, wall=wall)
    log.info("Declined %d expired registration(s), %d never warned", total.done, total.unwarned)
    return ExpireUnconfirmedRegistrationsResult(
        declined=total.done, declined_unwarned=total.unwarned, invalid_users=total.invalid
    )
