"""Demo data for the local stack: on a new database, rows that give every job work.

Written through the models as the app would, relative to ``now`` (the stack's start):

- admin ``admin@example.com`` (the dashboard's sign-in), a second admin;
- pending users around each registration cutoff: confirmed 5 days ago and not reminded
  (due for PendingUsersReminderJob), confirmed yesterday (not yet), already reminded;
  unconfirmed ones created 6 days ago (inside the expiry warning window), 2 days ago
  (not yet) and 9 days ago (past expiry: declined), each with a confirmation token;
- refresh tokens expired (also revoked) and live (also revoked but not expired);
- markers trashed 40 days ago (deleted for good), 5 days ago (kept), not trashed;
- uploads still ``pending`` 2 days after upload (files on disk, removed), an hour old,
  and a ``ready`` one (kept);
- recurring definitions on month ends (31st, 30th), Feb 29, a weekly one every other week,
  a disabled one and an invalid one (interval 0: logged and skipped);
- queued emails (``generic``), one of them high priority.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from backjobs.db import session_scope
from backjobs.models import (
    EmailConfirmationToken,
    Marker,
    RecurringTransaction,
    RefreshToken,
    StoredFile,
    User,
)
from backjobs.outbox import enqueue_email
from backjobs.settings import Settings

ADMIN_EMAIL = "admin@example.com"
DEMO_EMAILS = 3


@dataclass(frozen=True)
class DemoSummary:
    users: int
    refresh_tokens: int
    markers: int
    stored_files: int
    recurring_definitions: int
    queued_emails: int


def is_empty(engine: Engine) -> bool:
    """No user yet: a new database, the only kind that gets demo data."""
    with session_scope(engine) as session:
        return not session.scalar(select(func.count()).select_from(User))


def seed_demo_data(engine: Engine, *, now: datetime, settings: Settings) -> DemoSummary:
    """Insert the demo rows (see the module docstring) in one transaction."""
    with session_scope(engine) as session:
        users = _users(session, now=now, settings=settings)
        owner = users[0]
        tokens = _refresh_tokens(session, owner=owner, now=now)
        markers = _markers(session, owner=owner, now=now)
        files = _stored_files(session, owner=owner, now=now, root=settings.storage_root)
        recurring = _recurring(session, owner=owner, today=now.date())
        for number in range(DEMO_EMAILS):
            enqueue_email(
                session,
                to=f"demo{number + 1}@example.com",
                template="generic",
                context={
                    "subject": f"Welcome to the demo ({number + 1})",
                    "body": "Sent by EmailSendJob from the outbox of the local stack.",
                },
                priority=10 if number == 0 else 0,
                now=now,
                settings=settings,
            )
        return DemoSummary(
            users=len(users),
            refresh_tokens=tokens,
            markers=markers,
            stored_files=files,
            recurring_definitions=recurring,
            queued_emails=DEMO_EMAILS,
        )


def _users(session: Session, *, now: datetime, settings: Settings) -> list[User]:
    day = timedelta(days=1)
    reminder_due = settings.pending_user_notification_days + 2
    lifetime = settings.registration_confirmation_days
    warning = max(lifetime - 1, 1)  # created this many days ago: expires within a day
    users = [
        User(email=ADMIN_EMAIL, display_name="Admin", is_admin=True,
             registration_status="approved", email_confirmed_at=now - 30 * day,
             created_at=now - 30 * day),
        User(email="ops@example.com", display_name="Ops", is_admin=True,
             registration_status="approved", email_confirmed_at=now - 20 * day,
             created_at=now - 20 * day),
        User(email="alice.pending@example.com", display_name="Alice (confirmed, to remind)",
             email_confirmed_at=now - reminder_due * day,
             created_at=now - (reminder_due + 1) * day),
        User(email="bob.pending@example.com", display_name="Bob (confirmed, to remind)",
             email_confirmed_at=now - reminder_due * day - 3 * timedelta(hours=1),
             created_at=now - (reminder_due + 1) * day),
        User(email="carol.pending@example.com", display_name="Carol (confirmed yesterday)",
             email_confirmed_at=now - day, created_at=now - 2 * day),
        User(email="dave.pending@example.com", display_name="Dave (already reminded)",
             email_confirmed_at=now - 10 * day, created_at=now - 11 * day,
             pending_reminder_sent_at=now - 6 * day),
        User(email="erin.unconfirmed@example.com", display_name="Erin (expires soon)",
             created_at=now - warning * day),
        User(email="frank.unconfirmed@example.com", display_name="Frank (registered 2 days ago)",
             created_at=now - 2 * day),
        User(email="grace.unconfirmed@example.com", display_name="Grace (past expiry)",
             created_at=now - (lifetime + 2) * day),
    ]  # fmt: skip
    session.add_all(users)
    session.flush()
    for user in users:
        if user.email_confirmed_at is None:
            session.add(
                EmailConfirmationToken(
                    user_id=user.id,
                    token_hash=_hash(f"confirm-{user.email}"),
                    expires_at=user.created_at + timedelta(days=lifetime),
                    created_at=user.created_at,
                )
            )
    return users


def _refresh_tokens(session: Session, *, owner: User, now: datetime) -> int:
    hour, day = timedelta(hours=1), timedelta(days=1)
    rows = [
        (now - 10 * day, None),  # expired
        (now - hour, None),  # just expired
        (now - 2 * day, now - 3 * day),  # revoked and expired
        (now + 7 * day, None),  # live
        (now + 3 * day, now - hour),  # revoked, not expired: kept to recognise reuse
    ]
    session.add_all(
        RefreshToken(
            user_id=owner.id,
            token_hash=_hash(f"refresh-{i}"),
            expires_at=expires,
            revoked_at=revoked,
            created_at=now - 14 * day,
        )
        for i, (expires, revoked) in enumerate(rows)
    )
    return len(rows)


def _markers(session: Session, *, owner: User, now: datetime) -> int:
    day = timedelta(days=1)
    rows = [("Old trip", now - 40 * day), ("Old cafe", now - 45 * day),
            ("Trashed this week", now - 5 * day), ("Home", None), ("Office", None)]  # fmt: skip
    session.add_all(Marker(owner_id=owner.id, title=t, deleted_at=d) for t, d in rows)
    return len(rows)


def _stored_files(session: Session, *, owner: User, now: datetime, root: Path) -> int:
    rows = [
        ("uploads/demo/abandoned-1.jpg", "pending", now - timedelta(days=2)),
        ("uploads/demo/abandoned-2.pdf", "pending", now - timedelta(days=3)),
        ("uploads/demo/uploading.png", "pending", now - timedelta(hours=1)),
        ("uploads/demo/ready.txt", "ready", now - timedelta(days=10)),
    ]
    for key, status, created in rows:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"demo upload\n")
        session.add(
            StoredFile(
                owner_id=owner.id,
                storage_key=key,
                size_bytes=12,
                processing_status=status,
                created_at=created,
            )
        )
    return len(rows)


def _recurring(session: Session, *, owner: User, today: date) -> int:
    year = today.year
    rows = [
        ("Rent (monthly on the 31st)", "monthly", 1, date(year - 1, 1, 31), True, "-950"),
        ("Salary (monthly on the 30th)", "monthly", 1, date(year - 1, 11, 30), True, "2500"),
        ("Leap-day subscription (yearly on Feb 29)", "yearly", 1, date(2024, 2, 29), True, "-29"),
        ("Cleaning (every other week)", "weekly", 2, today - timedelta(days=60), True, "-40"),
        ("Gym (disabled)", "monthly", 1, date(year - 1, 6, 15), False, "-30.00"),
        ("Broken definition (interval 0)", "monthly", 0, date(year - 1, 6, 1), True, "-1.00"),
    ]
    session.add_all(
        RecurringTransaction(
            owner_id=owner.id,
            amount=Decimal(amount),
            currency="EUR",
            description=description,
            frequency=frequency,
            interval=interval,
            start_date=start,
            enabled=enabled,
        )
        for description, frequency, interval, start, enabled, amount in rows
    )
    return len(rows)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
