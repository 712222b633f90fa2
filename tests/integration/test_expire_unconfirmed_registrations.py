"""ExpireUnconfirmedRegistrationsJob's logic and confirm_email on a real database."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from backjobs.db import session_scope
from backjobs.jobs.expire_unconfirmed_registrations import (
    ExpireUnconfirmedRegistrationsResult,
    decline_expired_registrations,
    warn_expiring_registrations,
)
from backjobs.mail.render import render_email
from backjobs.models import EmailConfirmationToken
from backjobs.registration import ConfirmationRefused, Refusal, confirm_email, hash_token
from backjobs.settings import Settings
from tests.support.databases import Database
from tests.support.registration import (
    add_user,
    add_users,
    queued,
    settings,
    token_in,
    tokens,
    user,
    users_by_email,
)

AS_OF = datetime(2026, 1, 10, 5, 0, tzinfo=UTC)
LIFETIME = timedelta(days=7)  # BACKJOBS_REGISTRATION_CONFIRMATION_DAYS
WINDOW = timedelta(days=2)  # BACKJOBS_REGISTRATION_EXPIRY_WARNING_DAYS
SECOND = timedelta(seconds=1)
Result = ExpireUnconfirmedRegistrationsResult


def run(db: Database, *, now: datetime = AS_OF, s: Settings | None = None) -> Result:
    """Both parts, replayed as if the real time were ``now``."""
    s = s or settings()
    warned = warn_expiring_registrations(db.engine, now=now, settings=s, wall=lambda: now)
    declined = decline_expired_registrations(db.engine, now=now, settings=s, wall=lambda: now)
    return warned.merge(declined)


def created_for_expiry(expiry: datetime) -> datetime:
    return expiry - LIFETIME


def test_each_cutoff_to_the_second(db: Database) -> None:
    ids = {
        # Warning window: expiry in (as_of, as_of + 2 days].
        "window-edge": created_for_expiry(AS_OF + WINDOW),
        "inside": created_for_expiry(AS_OF + WINDOW - SECOND),
        "outside": created_for_expiry(AS_OF + WINDOW + SECOND),
        "about-to": created_for_expiry(AS_OF + SECOND),
        # Expiry: at or before as_of.
        "expires-now": created_for_expiry(AS_OF),
        "expired": created_for_expiry(AS_OF - SECOND),
    }
    user_ids = {k: add_user(db, f"{k}@example.com", created_at=v) for k, v in ids.items()}
    assert run(db) == Result(warned=3, declined=2, declined_unwarned=2)
    users = users_by_email(db)
    warned = {k for k in ids if users[f"{k}@example.com"].expiry_warning_sent_at == AS_OF}
    declined = {k for k in ids if users[f"{k}@example.com"].registration_status == "declined"}
    assert warned == {"window-edge", "inside", "about-to"}
    assert declined == {"expires-now", "expired"}
    assert {e["to"][0] for e in queued(db, "registration_expiry_warning")} == {
        f"{k}@example.com" for k in warned
    }
    assert {e["to"][0] for e in queued(db, "registration_expired")} == {
        f"{k}@example.com" for k in declined
    }
    [token] = tokens(db, user_ids["inside"])
    assert token.expires_at == AS_OF + WINDOW - SECOND  # the registration's expiry
    # Re-running the same as_of changes nothing and queues nothing.
    before = len(queued(db))
    assert run(db) == Result(warned=0, declined=0, declined_unwarned=0)
    assert len(queued(db)) == before and len(tokens(db, user_ids["inside"])) == 1


def test_confirmed_approved_and_declined_users_are_never_touched(db: Database) -> None:
    old = AS_OF - timedelta(days=30)
    soon = created_for_expiry(AS_OF + timedelta(days=1))
    add_user(db, "confirmed@example.com", created_at=old, confirmed_at=old)
    add_user(db, "confirmed-soon@example.com", created_at=soon, confirmed_at=soon)
    add_user(db, "approved@example.com", created_at=old, status="approved")
    add_user(db, "approved-soon@example.com", created_at=soon, status="approved")
    add_user(db, "declined@example.com", created_at=old, status="declined")
    assert run(db) == Result(warned=0, declined=0, declined_unwarned=0)
    assert queued(db) == []
    users = users_by_email(db)
    assert users["confirmed@example.com"].registration_status == "pending"
    assert all(u.expiry_warning_sent_at is None for u in users.values())


def test_warning_then_expiry_across_two_runs(db: Database) -> None:
    created = created_for_expiry(AS_OF + timedelta(days=1, hours=12))
    user_id = add_user(db, "ann@example.com", created_at=created, display_name="Ann")
    first = run(db)
    assert (first.warned, first.declined) == (1, 0)
    second = run(db, now=AS_OF + timedelta(days=1))  # still within the window: no 2nd warning
    assert (second.warned, second.declined) == (0, 0)
    third = run(db, now=AS_OF + timedelta(days=2))
    assert third == Result(warned=0, declined=1, declined_unwarned=0)
    assert user(db, user_id).registration_status == "declined"
    assert [e["template"] for e in queued(db)] == [
        "registration_expiry_warning",
        "registration_expired",
    ]
    notice = queued(db)[1]["context"]
    assert notice["expired_at"] == (created + LIFETIME).isoformat().replace("+00:00", "Z")
    # The warning's token ran out with the registration.
    [token] = tokens(db, user_id)
    assert token.expires_at == created + LIFETIME and token.used_at is None


def test_the_new_token_confirms_and_the_older_one_no_longer_does(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    created = created_for_expiry(AS_OF + timedelta(days=1))
    user_id = add_user(db, "ann@example.com", created_at=created)
    with db.session() as s:  # the token the app sent at registration
        s.add(
            EmailConfirmationToken(
                user_id=user_id, token_hash=hash_token("first-token"), expires_at=created + LIFETIME
            )
        )
        s.commit()
    with caplog.at_level(logging.DEBUG, logger="backjobs"):
        run(db)
    [warning] = queued(db, "registration_expiry_warning")
    link = warning["context"]["confirmation_link"]
    assert link.startswith("http://localhost:8000/confirm-email?token=")
    raw = token_in(link)
    assert raw not in caplog.text
    stored = [t.token_hash for t in tokens(db, user_id)]
    assert hash_token(raw) in stored and raw not in stored

    later = AS_OF + timedelta(hours=3)
    with session_scope(db.engine) as s, pytest.raises(ConfirmationRefused) as old:
        confirm_email(s, token="first-token", now=later)
    assert old.value.reason is Refusal.EXPIRED and "first-token" not in str(old.value)
    with session_scope(db.engine) as s:
        confirmed = confirm_email(s, token=raw, now=later)
    assert (confirmed.user_id, confirmed.email_confirmed_at) == (user_id, later)
    assert user(db, user_id).email_confirmed_at == later
    with session_scope(db.engine) as s, pytest.raises(ConfirmationRefused) as again:
        confirm_email(s, token=raw, now=later + SECOND)
    assert again.value.reason is Refusal.USED and raw not in str(again.value)
    with session_scope(db.engine) as s, pytest.raises(ConfirmationRefused) as unknown:
        confirm_email(s, token="never-issued", now=later)
    assert unknown.value.reason is Refusal.UNKNOWN
    # Confirmed: the expiry run leaves the user alone.
    assert run(db, now=AS_OF + timedelta(days=5)) == Result(
        warned=0, declined=0, declined_unwarned=0
    )
    assert user(db, user_id).registration_status == "pending"


def test_a_token_is_refused_once_the_registration_expired(db: Database) -> None:
    user_id = add_user(db, "late@example.com", created_at=created_for_expiry(AS_OF + SECOND))
    run(db)
    raw = token_in(queued(db)[0]["context"]["confirmation_link"])
    with session_scope(db.engine) as s, pytest.raises(ConfirmationRefused) as late:
        confirm_email(s, token=raw, now=AS_OF + SECOND)  # the registration's expiry
    assert late.value.reason is Refusal.EXPIRED
    assert user(db, user_id).email_confirmed_at is None


def test_display_names_are_escaped_and_a_bad_address_is_skipped(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    soon = created_for_expiry(AS_OF + timedelta(days=1))
    add_user(db, "x@example.com", created_at=soon, display_name="<b>Eve</b> & Co")
    bad = add_user(db, "not an address", created_at=soon)
    bad_old = add_user(db, "also\nbad", created_at=AS_OF - timedelta(days=30))
    with caplog.at_level(logging.WARNING, logger="backjobs"):
        result = run(db)
    assert result == Result(warned=1, declined=1, declined_unwarned=1, invalid_users=2)
    assert f"user {bad} has an invalid email address" in caplog.text
    [email] = queued(db)
    html = render_email(email["template"], email["context"]).html
    assert "&lt;b&gt;Eve&lt;/b&gt; &amp; Co" in html and "<b>Eve" not in html
    assert user(db, bad).expiry_warning_sent_at is None and tokens(db, bad) == []
    assert user(db, bad_old).registration_status == "declined"


def test_batches_cover_every_user(db: Database) -> None:
    soon = created_for_expiry(AS_OF + timedelta(days=1))
    gone = AS_OF - timedelta(days=30)
    add_users(
        db,
        [{"email": f"w{i}@example.com", "created_at": soon} for i in range(25)]
        + [{"email": f"d{i}@example.com", "created_at": gone} for i in range(25)],
    )
    result = run(db, s=settings(registration_batch_size=7))
    assert (result.warned, result.declined) == (25, 25)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(EmailConfirmationToken)) == 25


@pytest.mark.postgres
def test_two_runs_at_once_warn_and_decline_each_user_once(pg_db: Database) -> None:
    soon = created_for_expiry(AS_OF + timedelta(days=1))
    gone = AS_OF - timedelta(days=30)
    add_users(
        pg_db,
        [{"email": f"w{i}@example.com", "created_at": soon} for i in range(300)]
        + [{"email": f"d{i}@example.com", "created_at": gone} for i in range(300)],
    )
    small = settings(registration_batch_size=20)
    barrier = threading.Barrier(2)
    results: list[Result] = []

    def one_run() -> None:
        barrier.wait()
        results.append(run(pg_db, s=small))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.warned or 0 for r in results) == 300
    assert sum(r.declined or 0 for r in results) == 300
    recipients = [e["to"][0] for e in queued(pg_db)]
    assert len(recipients) == len(set(recipients)) == 600
    with pg_db.session() as s:
        assert s.scalar(select(func.count()).select_from(EmailConfirmationToken)) == 300


def test_a_failed_batch_names_no_token(db: Database) -> None:
    add_user(db, "ann@example.com", created_at=created_for_expiry(AS_OF + timedelta(days=1)))
    with db.engine.begin() as conn:  # the outbox refuses every insert
        if db.is_postgres:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON app_tasks "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON app_tasks "
                "BEGIN SELECT RAISE(ABORT, 'outbox refused'); END"
            )
    with pytest.raises(Exception, match="outbox refused") as failed:
        warn_expiring_registrations(db.engine, now=AS_OF, settings=settings(), wall=lambda: AS_OF)
    assert "confirm-email" not in str(failed.value) and "token=" not in str(failed.value)
    assert tokens(db, users_by_email(db)["ann@example.com"].id) == []  # rolled back
    assert users_by_email(db)["ann@example.com"].expiry_warning_sent_at is None
