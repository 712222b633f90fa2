"""PendingUsersReminderJob's domain: tell the admins who is waiting for approval.

Due users: ``registration_status = 'pending'``, ``email_confirmed_at`` at least
``BACKJOBS_PENDING_USER_NOTIFICATION_DAYS`` before ``now``, and ``pending_reminder_sent_at``
null. When there are any, **one** email addressed to every admin (``users.is_admin``)
lists them oldest confirmation first — at most :data:`MAX_LISTED_USERS`, with "and N more
waiting" for the rest — and ``pending_reminder_sent_at = now`` is set on exactly the listed
users, in the same transaction as the enqueue: a crash leaves both or neither. Unlisted
users are listed by the next run.

No admin (or none with a valid address): nothing is enqueued, nobody is marked, a warning
is logged and the run reports ``skipped_no_admin``; the users stay due. An admin whose
address is invalid is left out of the recipients and logged by id.

A due user whose line cannot be made (a name or address holding a NUL or a lone
surrogate, or not text at all, as SQLite allows) is logged by id, counted
``invalid_users`` and left unmarked (work left undone until the data is fixed); the
others are listed as usual, so one bad row stops no one. Such users still count in "N
more waiting": they are waiting.

Concurrency: runs take turns. On PostgreSQL a run first takes a transaction-level
advisory lock (:data:`RUN_LOCK`), so a second run at the same moment waits for the first
to commit and then sees its marks: it lists the next users and its "N more waiting"
counts only those still unlisted (two runs side by side once both said "150 more" when
50 remained). SQLite serialises writers (``BEGIN IMMEDIATE``). The users are then claimed
``FOR UPDATE SKIP LOCKED`` (a user the app holds is left for the next run) and the mark is
guarded by ``pending_reminder_sent_at IS NULL``. Lock order: the run lock, then ``users``
(:mod:`backjobs.registration`'s order; no tokens are touched). The caller owns the
transaction: this module only flushes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres
from backjobs.mail.render import MAX_LISTED_USERS, check_address
from backjobs.models import RegistrationStatus, User
from backjobs.outbox import NewEmail, check_email, enqueue_email
from backjobs.registration import claim_users, user_text
from backjobs.settings import Settings

log = logging.getLogger(__name__)

TEMPLATE = "pending_users_reminder"
# PostgreSQL advisory lock key ("backjobs" + "PUR" in ASCII): one reminder run at a time.
RUN_LOCK = 0x6261636B6A505552


@dataclass(frozen=True)
class PendingUsersReminderResult:
    """What one run did: users listed (and marked), those left for the next run, emails."""

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("skipped_no_admin", "invalid_users")

    users_listed: int = 0
    users_left_for_next_run: int = 0
    emails_enqueued: int = 0
    admin_recipients: int = 0
    skipped_no_admin: int = 0  # 1 when users were due but no admin could be told
    invalid_users: int = 0  # due users whose line could not be made: skipped, unmarked


class WaitingUser(NamedTuple):
    id: int
    display_name: str | None
    email: str
    confirmed_at: datetime


def _due(now: datetime, settings: Settings) -> list[ColumnElement[bool]]:
    cutoff = now - timedelta(days=settings.pending_user_notification_days)
    return [
        User.registration_status == RegistrationStatus.PENDING.value,
        User.email_confirmed_at.is_not(None),
        User.email_confirmed_at <= cutoff,
        User.pending_reminder_sent_at.is_(None),
    ]


def admin_addresses(session: Session) -> list[str]:
    """Every admin's address, by id; invalid ones logged (by id) and left out."""
    addresses = []
    for user_id, email in session.execute(
        select(User.id, user_text(session, User.email))
        .where(User.is_admin.is_(True))
        .order_by(User.id)
    ):
        try:
            addresses.append(check_address(email))
        except ValueError:
            log.warning(
                "admin user %s has an invalid email address; not sent the reminder", user_id
            )
    return addresses


def claim_waiting_users(
    session: Session,
    *,
    now: datetime,
    settings: Settings,
    limit: int,
    after: WaitingUser | None = None,
) -> list[WaitingUser]:
    """The ``limit`` longest-waiting due users (after ``after``, in that order), locked
    (skipping others' locks) on PostgreSQL."""
    query = (
        select(
            User.id,
            user_text(session, User.display_name),
            user_text(session, User.email),
            User.email_confirmed_at,
        )
        .where(*_due(now, settings))
        .order_by(User.email_confirmed_at, User.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(
            or_(
                User.email_confirmed_at > after.confirmed_at,
                and_(User.email_confirmed_at == after.confirmed_at, User.id > after.id),
            )
        )
    return [WaitingUser._make(row) for row in claim_users(session, query)]


def _line(user: WaitingUser, now: datetime) -> dict[str, Any]:
    return {
        "display_name": user.display_name,
        "email": user.email,
        "confirmed_at": user.confirmed_at,
        "days_waiting": (now - user.confirmed_at).days,
    }


def _listable(
    session: Session, *, now: datetime, settings: Settings, admins: list[str]
) -> tuple[list[WaitingUser], int]:
    """Up to :data:`MAX_LISTED_USERS` due users whose line can be made, and how many
    could not (logged by id); claimed in key order past the bad ones."""
    listed: list[WaitingUser] = []
    invalid = 0
    after: WaitingUser | None = None
    while len(listed) < MAX_LISTED_USERS:
        limit = MAX_LISTED_USERS - len(listed)
        batch = claim_waiting_users(session, now=now, settings=settings, limit=limit, after=after)
        for user in batch:
            context = {"users": [_line(user, now)], "more_waiting": 0}
            try:
                check_email(NewEmail(admins, TEMPLATE, context), settings=settings)
            except ValueError as exc:
                log.warning("pending user %s cannot be listed (%s); not reminded", user.id, exc)
                invalid += 1
                continue
            listed.append(user)
        if len(batch) < limit:
            break
        after = batch[-1]
    return listed, invalid


def _take_turn(session: Session) -> None:
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RUN_LOCK})


def remind_admins_of_pending_users(
    session: Session, *, now: datetime, settings: Settings
) -> PendingUsersReminderResult:
    """Enqueue one reminder to all admins listing the due users; mark the listed ones."""
    _take_turn(session)
    due = _due(now, settings)
    if not claim_waiting_users(session, now=now, settings=settings, limit=1):
        return PendingUsersReminderResult()
    admins = admin_addresses(session)
    if not admins:
        total = int(session.scalar(select(func.count()).select_from(User).where(*due)) or 0)
        log.warning(
            "%d user(s) await approval but no admin has a valid email address: no reminder sent",
            total,
        )
        return PendingUsersReminderResult(users_left_for_next_run=total, skipped_no_admin=1)
    waiting, invalid = _listable(session, now=now, settings=settings, admins=admins)
    marked = set(
        session.scalars(
            update(User)
            .where(User.id.in_([u.id for u in waiting]), User.pending_reminder_sent_at.is_(None))
            .values(pending_reminder_sent_at=now)
            .returning(User.id)
        )
    )
    listed = [u for u in waiting if u.id in marked]
    # Counted after marking, in this transaction: every due user not listed here.
    more = int(session.scalar(select(func.count()).select_from(User).where(*due)) or 0)
    if not listed:
        return PendingUsersReminderResult(users_left_for_next_run=more, invalid_users=invalid)
    enqueue_email(
        session,
        to=admins,
        template=TEMPLATE,
        context={"users": [_line(u, now) for u in listed], "more_waiting": more},
        now=now,
        settings=settings,
    )
    log.info(
        "Reminded %d admin(s) of %d pending user(s); %d more waiting",
        len(admins),
        len(listed),
        more,
    )
    return PendingUsersReminderResult(
        users_listed=len(listed),
        users_left_for_next_run=more,
        emails_enqueued=1,
        admin_recipients=len(admins),
        invalid_users=invalid,
    )
