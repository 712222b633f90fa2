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

Concurrency: the listed users are claimed ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and the
mark is guarded by ``pending_reminder_sent_at IS NULL``, so two runs at the same moment
list each user once (the second lists the next ones, or nothing). SQLite serialises
writers (``BEGIN IMMEDIATE``). The caller owns the transaction: this module only flushes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar, NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.db import is_postgres
from backjobs.mail.render import MAX_LISTED_USERS, check_address
from backjobs.models import RegistrationStatus, User
from backjobs.outbox import enqueue_email
from backjobs.settings import Settings

log = logging.getLogger(__name__)

TEMPLATE = "pending_users_reminder"


@dataclass(frozen=True)
class PendingUsersReminderResult:
    """What one run did: users listed (and marked), those left for the next run, emails."""

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("skipped_no_admin",)  # nobody told

    users_listed: int = 0
    users_left_for_next_run: int = 0
    emails_enqueued: int = 0
    admin_recipients: int = 0
    skipped_no_admin: int = 0  # 1 when users were due but no admin could be told


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
        select(User.id, User.email).where(User.is_admin.is_(True)).order_by(User.id)
    ):
        try:
            addresses.append(check_address(email))
        except ValueError:
            log.warning(
                "admin user %s has an invalid email address; not sent the reminder", user_id
            )
    return addresses


def claim_waiting_users(
    session: Session, *, now: datetime, settings: Settings, limit: int
) -> list[WaitingUser]:
    """The ``limit`` longest-waiting due users, locked (skipping others' locks) on PostgreSQL."""
    query = (
        select(User.id, User.display_name, User.email, User.email_confirmed_at)
        .where(*_due(now, settings))
        .order_by(User.email_confirmed_at, User.id)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=User)
    return [WaitingUser._make(row) for row in session.execute(query)]


def remind_admins_of_pending_users(
    session: Session, *, now: datetime, settings: Settings
) -> PendingUsersReminderResult:
    """Enqueue one reminder to all admins listing the due users; mark the listed ones."""
    due = _due(now, settings)
    waiting = claim_waiting_users(session, now=now, settings=settings, limit=MAX_LISTED_USERS)
    if not waiting:
        return PendingUsersReminderResult()
    admins = admin_addresses(session)
    total = int(session.scalar(select(func.count()).select_from(User).where(*due)) or 0)
    if not admins:
        log.warning(
            "%d user(s) await approval but no admin has a valid email address: no reminder sent",
            total,
        )
        return PendingUsersReminderResult(users_left_for_next_run=total, skipped_no_admin=1)
    marked = set(
        session.scalars(
            update(User)
            .where(User.id.in_([u.id for u in waiting]), User.pending_reminder_sent_at.is_(None))
            .values(pending_reminder_sent_at=now)
            .returning(User.id)
        )
    )
    listed = [u for u in waiting if u.id in marked]
    if not listed:
        return PendingUsersReminderResult()
    users = [
        {
            "display_name": u.display_name,
            "email": u.email,
            "confirmed_at": u.confirmed_at,
            "days_waiting": (now - u.confirmed_at).days,
        }
        for u in listed
    ]
    more = max(total - len(listed), 0)
    enqueue_email(
        session,
        to=admins,
        template=TEMPLATE,
        context={"users": users, "more_waiting": more},
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
    )
