"""Done-when for the registration jobs: a scripted week of daily runs over a seeded database,
both jobs and then the email sender into a real SMTP server, gives exactly the expected
emails and user states — and nothing more when the week is replayed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backjobs.db import session_scope
from backjobs.jobs.expire_unconfirmed_registrations import (
    decline_expired_registrations,
    warn_expiring_registrations,
)
from backjobs.jobs.pending_users_reminder import remind_admins_of_pending_users
from backjobs.registration import confirm_email
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.registration import add_user, token_in, users_by_email
from tests.support.smtp import SmtpServer

DAYS = [datetime(2026, 1, d, tzinfo=UTC) for d in range(5, 12)]  # Mon 5th .. Sun 11th
ADMINS = ("boss@example.com", "deputy@example.com")
CONFIRMED_AT = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)


def seed(db: Database) -> None:
    long_ago = datetime(2025, 6, 1, tzinfo=UTC)
    for admin in ADMINS:
        add_user(db, admin, created_at=long_ago, status="approved", is_admin=True)
    # Unconfirmed: expiry = created_at + 7 days; warned when it is at most 2 days away.
    add_user(db, "forgotten@example.com", created_at=datetime(2025, 12, 20, tzinfo=UTC))
    add_user(db, "slow@example.com", created_at=datetime(2025, 12, 31, 12, tzinfo=UTC))
    add_user(db, "confirmer@example.com", created_at=datetime(2026, 1, 1, 10, tzinfo=UTC))
    add_user(db, "newcomer@example.com", created_at=datetime(2026, 1, 9, tzinfo=UTC))
    add_user(db, "approved@example.com", created_at=long_ago, status="approved")
    # Confirmed, waiting for approval: due 3 days after confirming.
    waited = datetime(2026, 1, 2, 9, tzinfo=UTC)
    add_user(db, "waiting@example.com", created_at=long_ago, confirmed_at=waited,
             display_name="Wait <er>")  # fmt: skip
    fresh = datetime(2026, 1, 4, 7, tzinfo=UTC)
    add_user(db, "fresh@example.com", created_at=long_ago, confirmed_at=fresh)


def day(db: Database, midnight: datetime) -> None:
    settings = get_settings()
    expire_at = midnight + timedelta(hours=5)  # the crons: 0 5 * * *, 0 6 * * *
    at = lambda: expire_at  # noqa: E731 — the week is replayed as if it were happening
    warn_expiring_registrations(db.engine, now=expire_at, settings=settings, wall=at)
    decline_expired_registrations(db.engine, now=expire_at, settings=settings, wall=at)
    with session_scope(db.engine) as session:
        remind_admins_of_pending_users(
            session, now=midnight + timedelta(hours=6), settings=settings
        )
    drain(db, now=midnight + timedelta(hours=6, minutes=5))


def arrivals(server: SmtpServer, *, since: int, on: datetime) -> list[tuple[str, ...]]:
    """(day of the run, recipients, subject) of each message delivered after the first
    ``since`` (the Date header is the real time of sending, not the job's clock)."""
    label = on.strftime("%d %b %Y")
    return [(label, r.rcpt_tos, str(r.message["Subject"])) for r in server.messages[since:]]


def test_a_week_of_daily_runs(smtp_env: Database, smtp_server: SmtpServer) -> None:
    seed(smtp_env)
    delivered: list[tuple[str, ...]] = []
    for midnight in DAYS:
        before = len(smtp_server.messages)
        day(smtp_env, midnight)
        delivered += arrivals(smtp_server, since=before, on=midnight)
        if midnight.day == 7:  # the confirmer follows the link of the warning just received
            warning = smtp_server.messages[-1]
            assert warning.rcpt_tos == ("confirmer@example.com",)
            body = warning.message.get_body(preferencelist=("plain",))
            assert body is not None
            with session_scope(smtp_env.engine) as s:
                confirm_email(s, token=token_in(body.get_content()), now=CONFIRMED_AT)

    # One drain sends over parallel connections: arrival order within a day is not fixed.
    assert sorted(delivered) == sorted(
        [
            ("05 Jan 2026", ("forgotten@example.com",), "Your registration has expired"),
            ("06 Jan 2026", ("slow@example.com",), "Please confirm your email address"),
            ("06 Jan 2026", ADMINS, "1 user awaiting approval"),
            ("07 Jan 2026", ("confirmer@example.com",), "Please confirm your email address"),
            ("08 Jan 2026", ("slow@example.com",), "Your registration has expired"),
            ("08 Jan 2026", ADMINS, "1 user awaiting approval"),
            ("11 Jan 2026", ADMINS, "1 user awaiting approval"),
        ]
    )
    reminders = [m.message for m in smtp_server.messages if m.rcpt_tos == ADMINS]
    listed = []
    for reminder in reminders:
        html = reminder.get_body(preferencelist=("html",))
        assert html is not None
        listed.append(html.get_content())
    assert "Wait &lt;er&gt;" in listed[0] and "waiting@example.com" in listed[0]
    assert "fresh@example.com" in listed[1] and "confirmer@example.com" in listed[2]

    users = users_by_email(smtp_env)
    states = {
        email: (u.registration_status, u.expiry_warning_sent_at, u.pending_reminder_sent_at)
        for email, u in users.items()
        if not u.is_admin
    }
    at = lambda d, h: datetime(2026, 1, d, h, tzinfo=UTC)  # noqa: E731
    assert states == {
        "forgotten@example.com": ("declined", None, None),
        "slow@example.com": ("declined", at(6, 5), None),
        "confirmer@example.com": ("pending", at(7, 5), at(11, 6)),
        "newcomer@example.com": ("pending", None, None),
        "approved@example.com": ("approved", None, None),
        "waiting@example.com": ("pending", None, at(6, 6)),
        "fresh@example.com": ("pending", None, at(8, 6)),
    }
    assert users["confirmer@example.com"].email_confirmed_at == CONFIRMED_AT

    # The whole week again (retries, a replay): not one more email, no state change.
    delivered = len(smtp_server.messages)
    for midnight in DAYS:
        day(smtp_env, midnight)
    assert len(smtp_server.messages) == delivered
    assert {
        email: (u.registration_status, u.expiry_warning_sent_at, u.pending_reminder_sent_at)
        for email, u in users_by_email(smtp_env).items()
        if not u.is_admin
    } == states
