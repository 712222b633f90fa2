"""PendingUsersReminderJob's logic on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest

from backjobs.db import session_scope
from backjobs.jobs.pending_users_reminder import (
    PendingUsersReminderResult,
    remind_admins_of_pending_users,
)
from backjobs.mail.render import render_email
from backjobs.settings import Settings
from tests.support.databases import Database
from tests.support.registration import add_user, add_users, queued, settings, users_by_email

AS_OF = datetime(2026, 1, 10, 6, 0, tzinfo=UTC)
CUTOFF = AS_OF - timedelta(days=3)  # BACKJOBS_PENDING_USER_NOTIFICATION_DAYS = 3
SECOND = timedelta(seconds=1)
LONG_AGO = AS_OF - timedelta(days=30)


def remind(
    db: Database, *, now: datetime = AS_OF, s: Settings | None = None
) -> PendingUsersReminderResult:
    with session_scope(db.engine) as session:
        return remind_admins_of_pending_users(session, now=now, settings=s or settings())


def admins(db: Database, *emails: str) -> None:
    for email in emails:
        add_user(db, email, created_at=LONG_AGO, status="approved", is_admin=True)


def test_lists_exactly_the_due_users_to_every_admin(db: Database) -> None:
    admins(db, "boss@example.com", "deputy@example.com")
    add_user(db, "due@example.com", created_at=LONG_AGO, confirmed_at=CUTOFF - SECOND)
    add_user(db, "at@example.com", created_at=LONG_AGO, confirmed_at=CUTOFF, display_name="At")
    add_user(db, "early@example.com", created_at=LONG_AGO, confirmed_at=CUTOFF + SECOND)
    add_user(db, "unconfirmed@example.com", created_at=LONG_AGO)
    add_user(db, "ok@example.com", created_at=LONG_AGO, confirmed_at=LONG_AGO, status="approved")
    add_user(db, "no@example.com", created_at=LONG_AGO, confirmed_at=LONG_AGO, status="declined")
    add_user(
        db, "told@example.com", created_at=LONG_AGO, confirmed_at=LONG_AGO, reminded_at=LONG_AGO
    )

    assert remind(db) == PendingUsersReminderResult(
        users_listed=2, users_left_for_next_run=0, emails_enqueued=1, admin_recipients=2
    )
    [email] = queued(db)
    assert email["to"] == ["boss@example.com", "deputy@example.com"]
    assert [u["email"] for u in email["context"]["users"]] == ["due@example.com", "at@example.com"]
    assert [u["days_waiting"] for u in email["context"]["users"]] == [3, 3]
    users = users_by_email(db)
    assert users["due@example.com"].pending_reminder_sent_at == AS_OF
    assert users["at@example.com"].pending_reminder_sent_at == AS_OF
    assert users["early@example.com"].pending_reminder_sent_at is None
    assert users["told@example.com"].pending_reminder_sent_at == LONG_AGO
    assert users["ok@example.com"].pending_reminder_sent_at is None

    # The same as_of again (a retry, a re-run): nothing new.
    assert remind(db) == PendingUsersReminderResult()
    assert len(queued(db)) == 1
    # One second after the late one's cutoff it is listed, alone.
    assert remind(db, now=AS_OF + 2 * SECOND).users_listed == 1
    assert [u["email"] for u in queued(db)[1]["context"]["users"]] == ["early@example.com"]


def test_without_admins_nothing_is_sent_nor_marked(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    add_user(db, "due@example.com", created_at=LONG_AGO, confirmed_at=LONG_AGO)
    add_user(db, "bad admin", created_at=LONG_AGO, is_admin=True)  # invalid address: skipped
    with caplog.at_level(logging.WARNING, logger="backjobs"):
        result = remind(db)
    assert result == PendingUsersReminderResult(users_left_for_next_run=1, skipped_no_admin=1)
    assert queued(db) == []
    assert users_by_email(db)["due@example.com"].pending_reminder_sent_at is None
    assert "no admin has a valid email address" in caplog.text
    # Once an admin exists, the next run tells them.
    admins(db, "boss@example.com")
    assert remind(db).users_listed == 1


def test_more_than_100_users_list_the_oldest_100_and_count_the_rest(db: Database) -> None:
    admins(db, "boss@example.com")
    add_users(
        db,
        [
            {
                "email": f"u{i:03}@example.com",
                "created_at": LONG_AGO,
                "email_confirmed_at": LONG_AGO + timedelta(minutes=i),
            }
            for i in range(130)
        ],
    )
    first = remind(db)
    assert (first.users_listed, first.users_left_for_next_run) == (100, 30)
    [email] = queued(db)
    listed = [u["email"] for u in email["context"]["users"]]
    assert listed == [f"u{i:03}@example.com" for i in range(100)]
    assert email["context"]["more_waiting"] == 30
    rendered = render_email(email["template"], email["context"])
    assert "and 30 more waiting" in rendered.text and "and 30 more waiting" in rendered.html
    assert rendered.subject == "130 users awaiting approval"
    marked = [u for u in users_by_email(db).values() if u.pending_reminder_sent_at == AS_OF]
    assert len(marked) == 100
    # The next run lists the 30 others.
    second = remind(db, now=AS_OF + timedelta(days=1))
    assert (second.users_listed, second.users_left_for_next_run) == (30, 0)
    assert queued(db)[1]["context"]["users"][0]["email"] == "u100@example.com"


def test_display_names_are_escaped_in_the_html(db: Database) -> None:
    admins(db, "boss@example.com")
    name = '<img src=x onerror="alert(1)"> & Co'
    add_user(db, "x@example.com", created_at=LONG_AGO, confirmed_at=LONG_AGO, display_name=name)
    remind(db)
    [email] = queued(db)
    rendered = render_email(email["template"], email["context"])
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; &amp; Co" in rendered.html
    assert "<img" not in rendered.html
    assert name in rendered.text  # plain text stays as typed


@pytest.mark.postgres
def test_two_runs_at_once_list_each_user_once(pg_db: Database) -> None:
    admins(pg_db, "boss@example.com")
    add_users(
        pg_db,
        [
            {
                "email": f"u{i:03}@example.com",
                "created_at": LONG_AGO,
                "email_confirmed_at": LONG_AGO + timedelta(minutes=i),
            }
            for i in range(150)
        ],
    )
    barrier = threading.Barrier(2)
    results: list[PendingUsersReminderResult] = []

    def run() -> None:
        barrier.wait()
        results.append(remind(pg_db))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    listed = [u["email"] for email in queued(pg_db) for u in email["context"]["users"]]
    assert len(listed) == len(set(listed)) == sum(r.users_listed for r in results)
    # Either both ran side by side (100 + 50) or one after the other (100, then 50).
    assert sorted(r.users_listed for r in results) == [50, 100]
