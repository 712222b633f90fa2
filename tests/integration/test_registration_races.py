"""confirm_email and the registration jobs under races (issue 18): one lock order, one truth
per user, bad rows that stop no one, no dead links, right counts.

The PostgreSQL races hold their window open with a lock (a trigger waiting on an advisory
lock the test holds, or a transaction the test keeps open), never with a sleep.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from backjobs.db import session_scope
from backjobs.jobs.expire_unconfirmed_registrations import (
    ExpireUnconfirmedRegistrationsResult,
    decline_expired_registrations,
    warn_expiring_registrations,
)
from backjobs.jobs.pending_users_reminder import (
    PendingUsersReminderResult,
    remind_admins_of_pending_users,
)
from backjobs.models import EmailConfirmationToken, User
from backjobs.registration import (
    ConfirmationRefused,
    Confirmed,
    Refusal,
    confirm_email,
    hash_token,
)
from backjobs.settings import Settings
from tests.support.databases import Database
from tests.support.registration import (
    ROW_LOCK_WAITS,
    add_user,
    add_users,
    gate_closed,
    install_gate,
    on_thread,
    queued,
    settings,
    token_in,
    tokens,
    user,
    wait_for_lock_waits,
)

AS_OF = datetime(2026, 1, 10, 5, 0, tzinfo=UTC)
LIFETIME = timedelta(days=7)
SECOND = timedelta(seconds=1)
Result = ExpireUnconfirmedRegistrationsResult


def warn(db: Database, *, now: datetime = AS_OF, at: datetime | None = None) -> Result:
    wall = at or now
    return warn_expiring_registrations(db.engine, now=now, settings=settings(), wall=lambda: wall)


def decline(db: Database, *, now: datetime = AS_OF) -> Result:
    return decline_expired_registrations(db.engine, now=now, settings=settings(), wall=lambda: now)


def click(db: Database, token: str, *, now: datetime) -> Confirmed:
    with session_scope(db.engine) as s:
        return confirm_email(s, token=token, now=now)


def with_token(db: Database, email: str, *, expiry: datetime, token: str) -> int:
    """A pending user whose registration expires at ``expiry``, with the app's token."""
    user_id = add_user(db, email, created_at=expiry - LIFETIME)
    with db.session() as s:
        s.add(
            EmailConfirmationToken(user_id=user_id, token_hash=hash_token(token), expires_at=expiry)
        )
        s.commit()
    return user_id


# --- 1. One order of locks, one truth per user ------------------------------------------


def test_a_user_declined_by_the_job_or_an_admin_is_never_confirmed(db: Database) -> None:
    expiry = AS_OF - timedelta(minutes=1)
    by_job = with_token(db, "late@example.com", expiry=expiry, token="late-token")
    assert decline(db).declined == 1
    # The click was made a second before the expiry and arrives after the decline.
    with pytest.raises(ConfirmationRefused) as refused:
        click(db, "late-token", now=expiry - SECOND)
    assert refused.value.reason is Refusal.DECLINED
    assert user(db, by_job).email_confirmed_at is None

    by_admin = with_token(db, "no@example.com", expiry=AS_OF + LIFETIME, token="admin-token")
    with db.session() as s:
        s.get_one(User, by_admin).registration_status = "declined"
        s.commit()
    with pytest.raises(ConfirmationRefused) as refused:
        click(db, "admin-token", now=AS_OF)
    assert refused.value.reason is Refusal.DECLINED and "admin-token" not in str(refused.value)
    assert user(db, by_admin).email_confirmed_at is None


@pytest.mark.postgres
def test_a_click_during_the_warning_batch_waits_for_it_instead_of_deadlocking(
    pg_db: Database,
) -> None:
    user_id = with_token(pg_db, "ann@example.com", expiry=AS_OF + timedelta(days=1), token="t1")
    install_gate(pg_db, table="users", when="NEW.expiry_warning_sent_at IS NOT NULL")
    with gate_closed(pg_db):
        warner, warned = on_thread(lambda: warn(pg_db))
        wait_for_lock_waits(pg_db, events=frozenset({"advisory"}))  # the batch holds the user
        clicker, clicked = on_thread(lambda: click(pg_db, "t1", now=AS_OF + SECOND))
        wait_for_lock_waits(pg_db, events=ROW_LOCK_WAITS)
    warner.join(60)
    clicker.join(60)
    assert warned.error is None and warned.value.warned == 1
    # The warning superseded the clicked token first: refused, never a database error.
    assert isinstance(clicked.error, ConfirmationRefused), clicked.error
    assert clicked.error.reason is Refusal.EXPIRED
    assert user(pg_db, user_id).email_confirmed_at is None
    assert len(tokens(pg_db, user_id)) == 2


@pytest.mark.postgres
def test_a_click_racing_the_decline_is_refused_once_the_decline_holds_the_user(
    pg_db: Database,
) -> None:
    expiry = AS_OF - timedelta(minutes=1)
    user_id = with_token(pg_db, "late@example.com", expiry=expiry, token="late-token")
    install_gate(pg_db, table="users", when="NEW.registration_status = 'declined'")
    with gate_closed(pg_db):
        decliner, declined = on_thread(lambda: decline(pg_db))
        wait_for_lock_waits(pg_db, events=frozenset({"advisory"}))
        clicker, clicked = on_thread(lambda: click(pg_db, "late-token", now=expiry - SECOND))
        wait_for_lock_waits(pg_db, events=ROW_LOCK_WAITS)
    decliner.join(60)
    clicker.join(60)
    assert declined.error is None and declined.value.declined == 1
    assert isinstance(clicked.error, ConfirmationRefused), clicked.error
    assert clicked.error.reason is Refusal.DECLINED
    after = user(pg_db, user_id)
    assert (after.registration_status, after.email_confirmed_at) == ("declined", None)
    assert [e["to"] for e in queued(pg_db, "registration_expired")] == [["late@example.com"]]


@pytest.mark.postgres
def test_a_click_holding_the_user_first_is_confirmed_and_the_decline_skips_it(
    pg_db: Database,
) -> None:
    expiry = AS_OF - timedelta(minutes=1)
    user_id = with_token(pg_db, "late@example.com", expiry=expiry, token="late-token")
    with session_scope(pg_db.engine) as s:
        confirm_email(s, token="late-token", now=expiry - SECOND)
        assert decline(pg_db).declined == 0  # the click holds the user: skipped, not waited
    assert decline(pg_db).declined == 0  # confirmed now: never touched
    after = user(pg_db, user_id)
    assert (after.registration_status, after.email_confirmed_at) == ("pending", expiry - SECOND)
    assert queued(pg_db) == []


# --- 2. A bad row stops no one ----------------------------------------------------------


def _bad_rows(
    db: Database, tag: str, *, created_at: datetime, confirmed_at: datetime | None
) -> list[int]:
    """Users SQLite takes and no email can carry: a NUL in the name, a name that is not
    UTF-8 (a lone surrogate once decoded), an address that is not text at all."""
    ids = []
    for n, (name, email) in enumerate(
        [
            ("'Nul' || char(0) || 'Name'", None),
            ("CAST(X'41EDA08042' AS TEXT)", None),
            (None, f"X'00FF{tag.encode().hex()}'"),
        ]
    ):
        user_id = add_user(
            db, f"{tag}{n}@example.com", created_at=created_at, confirmed_at=confirmed_at
        )
        with db.engine.begin() as conn:
            if name:
                conn.exec_driver_sql(f"UPDATE users SET display_name = {name} WHERE id = {user_id}")
            if email:
                conn.exec_driver_sql(f"UPDATE users SET email = {email} WHERE id = {user_id}")
        ids.append(user_id)
    return ids


def test_a_user_that_cannot_be_emailed_is_skipped_and_the_batch_goes_on(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    soon = AS_OF + timedelta(days=1) - LIFETIME
    gone = AS_OF - timedelta(days=30)
    bad_warn = _bad_rows(sqlite_db, "w", created_at=soon, confirmed_at=None)
    bad_decline = _bad_rows(sqlite_db, "d", created_at=gone, confirmed_at=None)
    good_warn = add_user(sqlite_db, "soon@example.com", created_at=soon)
    good_decline = add_user(sqlite_db, "gone@example.com", created_at=gone)
    with caplog.at_level(logging.WARNING, logger="backjobs"):
        warned = warn(sqlite_db)
        declined = decline(sqlite_db)
    assert (warned.warned, warned.invalid_users) == (1, 3)
    assert (declined.declined, declined.invalid_users) == (4, 3)
    for user_id in bad_warn + bad_decline:
        assert f"user {user_id} " in caplog.text
    assert [e["to"] for e in queued(sqlite_db)] == [["soon@example.com"], ["gone@example.com"]]
    assert user(sqlite_db, good_warn).expiry_warning_sent_at == AS_OF
    assert all(tokens(sqlite_db, i) == [] for i in bad_warn)
    with sqlite_db.session() as s:
        warned_ids = s.scalars(select(User.id).where(User.expiry_warning_sent_at.is_not(None)))
        assert list(warned_ids) == [good_warn]
        declined_ids = s.scalars(select(User.id).where(User.registration_status == "declined"))
        assert sorted(declined_ids) == sorted(
            [*bad_decline, good_decline]
        )  # declined on time, the notice skipped


def test_a_pending_user_that_cannot_be_listed_is_skipped_and_the_others_are_listed(
    sqlite_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    long_ago = AS_OF - timedelta(days=30)
    add_user(sqlite_db, "boss@example.com", created_at=long_ago, status="approved", is_admin=True)
    bad = _bad_rows(sqlite_db, "r", created_at=long_ago, confirmed_at=long_ago)
    add_user(sqlite_db, "wait@example.com", created_at=long_ago, confirmed_at=long_ago + SECOND)
    with caplog.at_level(logging.WARNING, logger="backjobs"):
        with session_scope(sqlite_db.engine) as s:
            result = remind_admins_of_pending_users(s, now=AS_OF, settings=settings())
    assert (result.users_listed, result.invalid_users, result.emails_enqueued) == (1, 3, 1)
    assert result.users_left_for_next_run == 3  # they still wait, unmarked
    [email] = queued(sqlite_db, "pending_users_reminder")
    assert [u["email"] for u in email["context"]["users"]] == ["wait@example.com"]
    for user_id in bad:
        assert f"pending user {user_id} cannot be listed" in caplog.text


# --- 6. No dead links, right counts -----------------------------------------------------


def test_a_late_run_sends_no_link_that_expires_before_the_real_time(db: Database) -> None:
    real_now = AS_OF + timedelta(days=1)  # the run for AS_OF starts a day late
    dead = add_user(db, "dead@example.com", created_at=AS_OF + timedelta(hours=12) - LIFETIME)
    live = add_user(db, "live@example.com", created_at=AS_OF + timedelta(days=2) - LIFETIME)
    result = warn(db, now=AS_OF, at=real_now)
    assert result.warned == 1
    [email] = queued(db, "registration_expiry_warning")
    assert email["to"] == ["live@example.com"]
    assert tokens(db, dead) == [] and user(db, dead).expiry_warning_sent_at is None
    [token] = tokens(db, live)
    assert token.expires_at > real_now
    assert token.token_hash == hash_token(token_in(email["context"]["confirmation_link"]))
    # The next run (on time) declines the user whose link would have been dead.
    assert decline(db, now=real_now) == Result(declined=1, declined_unwarned=1)
    assert user(db, dead).registration_status == "declined"


@pytest.mark.postgres
def test_two_reminder_runs_at_once_count_what_is_really_left(pg_db: Database) -> None:
    long_ago = AS_OF - timedelta(days=30)
    add_user(pg_db, "boss@example.com", created_at=long_ago, status="approved", is_admin=True)
    add_users(
        pg_db,
        [
            {
                "email": f"u{i:03}@example.com",
                "created_at": long_ago,
                "email_confirmed_at": long_ago + timedelta(minutes=i),
            }
            for i in range(250)
        ],
    )

    def remind(s: Settings) -> PendingUsersReminderResult:
        with session_scope(pg_db.engine) as session:
            return remind_admins_of_pending_users(session, now=AS_OF, settings=s)

    first = pg_db.session()
    try:  # the first run, its transaction still open: the window
        a = remind_admins_of_pending_users(first, now=AS_OF, settings=settings())
        second, b = on_thread(lambda: remind(settings()))
        # With turns, the second run waits for the first; without, it just ends.
        wait_for_lock_waits(pg_db, events=frozenset({"advisory"}), or_done=b.done)
        first.commit()
    finally:
        first.close()
    second.join(60)
    assert b.error is None
    assert (a.users_listed, a.users_left_for_next_run) == (100, 150)
    assert (b.value.users_listed, b.value.users_left_for_next_run) == (100, 50)
    listed = [u["email"] for e in queued(pg_db) for u in e["context"]["users"]]
    assert len(listed) == len(set(listed)) == 200
    assert [e["context"]["more_waiting"] for e in queued(pg_db)] == [150, 50]
    with pg_db.session() as s:
        unmarked = select(func.count()).where(
            User.pending_reminder_sent_at.is_(None), User.email_confirmed_at.is_not(None)
        )
        assert s.scalar(unmarked) == 50
