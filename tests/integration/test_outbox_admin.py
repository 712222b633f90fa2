"""Outbox operations (status, retry, show) as functions, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.outbox_admin import (
    OutboxStatus,
    RetryRefused,
    describe_task,
    outbox_status,
    retry_failed,
)
from tests.support.databases import Database

NOW = datetime(2030, 1, 10, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _row(db: Database, **values: Any) -> int:
    defaults: dict[str, Any] = {
        "task_type": "email_send",
        "status": "pending",
        "payload": {"template": "generic", "to": ["a@example.com"], "context": {}},
        "next_attempt_at": NOW - HOUR,
        "created_at": NOW - 2 * HOUR,
    }
    with db.session() as s:
        task = AppTask(**(defaults | values))
        s.add(task)
        s.commit()
        return task.id


def _get(db: Database, task_id: int) -> AppTask:
    with db.session() as s:
        return s.execute(select(AppTask).where(AppTask.id == task_id)).scalar_one()


def test_status_counts_rows_by_what_ops_care_about(db: Database) -> None:
    _row(db, next_attempt_at=NOW - 3 * HOUR)  # due for three hours: the oldest
    _row(db, next_attempt_at=NOW)  # due exactly now
    _row(db, next_attempt_at=NOW + HOUR, attempts=1)  # waiting for its retry
    _row(db, status="processing", locked_until=NOW - HOUR / 2)  # a crashed sender's lease
    _row(db, status="processing", locked_until=NOW + HOUR / 2)  # being sent
    _row(db, status="completed", completed_at=NOW - HOUR)
    _row(db, status="failed", next_attempt_at=NOW - 2 * HOUR)  # failed within 24 h
    _row(db, status="failed", next_attempt_at=NOW - 30 * HOUR, created_at=NOW - 40 * HOUR)
    _row(db, task_type="something_else", status="failed")  # not the outbox
    with db.session() as s:
        status = outbox_status(s, now=NOW)
    assert status == OutboxStatus(
        pending=3,
        processing=2,
        completed=1,
        failed=2,
        due_now=3,
        waiting_retry=1,
        oldest_due_age_seconds=3 * 3600,
        failed_last_24h=1,
    )


def test_status_reads_due_on_the_job_clock_and_leases_and_failures_on_the_real_one(
    db: Database,
) -> None:
    real = NOW - 400 * 24 * HOUR  # a rehearsal run: as_of (NOW) far after the real time
    _row(db, next_attempt_at=NOW - HOUR)  # due at as_of
    _row(db, status="processing", locked_until=real + HOUR)  # a live lease, really
    _row(db, status="failed", next_attempt_at=real - HOUR, completed_at=real - HOUR)
    with db.session() as s:
        rehearsal = outbox_status(s, now=NOW, at=real)
        one_clock = outbox_status(s, now=NOW)
    assert (rehearsal.due_now, rehearsal.failed_last_24h) == (1, 1)  # the lease is live
    # Read on as_of alone, the live lease looks lapsed and the failure looks old.
    assert (one_clock.due_now, one_clock.failed_last_24h) == (2, 0)


def test_status_of_an_empty_outbox(db: Database) -> None:
    with db.session() as s:
        status = outbox_status(s, now=NOW)
    assert status == OutboxStatus(0, 0, 0, 0, 0, 0, None, 0)


def test_retry_by_id_gives_failed_rows_fresh_attempts(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    first = _row(db, status="failed", attempts=5, last_error="SMTP 550 no such user")
    second = _row(db, status="failed", attempts=2, completed_at=NOW - HOUR, last_error=None)
    other = _row(db, status="failed", attempts=5, last_error="untouched")
    caplog.set_level(logging.INFO, logger="backjobs")
    with db.session() as s:
        assert retry_failed(s, ids=[second, first], now=NOW) == [first, second]
        s.commit()
    row = _get(db, first)
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 0, NOW)
    assert (row.locked_until, row.completed_at) == (None, None)
    assert row.last_error == "[retried 2030-01-10T12:00:00+00:00] SMTP 550 no such user"
    assert _get(db, second).completed_at is None
    assert _get(db, second).last_error == "[retried 2030-01-10T12:00:00+00:00]"
    assert _get(db, other).status == "failed"
    logged = [r.getMessage() for r in caplog.records if "failed -> pending" in r.getMessage()]
    assert len(logged) == 2 and f"outbox task {first}:" in logged[0]
    assert "SMTP 550 no such user" in logged[0]
    # The retried row is due at once.
    with db.session() as s:
        assert outbox_status(s, now=NOW).due_now == 2


def test_retry_refuses_rows_that_are_not_failed_and_changes_nothing(db: Database) -> None:
    failed = _row(db, status="failed", attempts=5)
    pending = _row(db)
    done = _row(db, status="completed", completed_at=NOW)
    with db.session() as s, pytest.raises(RetryRefused) as raised:
        retry_failed(s, ids=[failed, pending, done, 999], now=NOW)
    message = str(raised.value)
    assert f"app_tasks id {pending}: status is pending" in message
    assert f"app_tasks id {done}: status is completed" in message
    assert "app_tasks id 999: no such outbox row" in message
    assert set(raised.value.refused) == {pending, done, 999}
    assert (_get(db, failed).status, _get(db, failed).attempts) == ("failed", 5)


def test_retry_failed_since_takes_the_rows_that_failed_after_it(db: Database) -> None:
    recent = _row(db, status="failed", next_attempt_at=NOW - HOUR)
    stamped = _row(db, status="failed", next_attempt_at=NOW - 50 * HOUR, completed_at=NOW - HOUR)
    old = _row(db, status="failed", next_attempt_at=NOW - 30 * HOUR, created_at=NOW - 31 * HOUR)
    _row(db, status="pending")
    with db.session() as s:
        assert retry_failed(s, failed_since=NOW - 24 * HOUR, now=NOW) == [recent, stamped]
        s.commit()
    assert _get(db, old).status == "failed"
    with db.session() as s:
        assert retry_failed(s, failed_since=NOW - 24 * HOUR, now=NOW) == []


def test_retry_wants_ids_or_a_time(db: Database) -> None:
    with db.session() as s:
        with pytest.raises(ValueError, match="either ids or failed_since"):
            retry_failed(s, now=NOW)
        with pytest.raises(ValueError, match="aware"):
            retry_failed(s, failed_since=datetime(2030, 1, 1), now=NOW)


def test_show_tells_a_rows_story_without_its_secrets(db: Database) -> None:
    with db.session() as s:
        task_id = enqueue_email(
            s,
            to=["new@example.com", "copy@example.com"],
            template="registration_expiry_warning",
            context={
                "display_name": "New User",
                "confirmation_link": "https://app.example/confirm?token=SECRET-TOKEN",
                "expires_at": NOW + 48 * HOUR,
            },
            priority=7,
            now=NOW,
            max_attempts=3,
        )
        s.commit()
    with db.session() as s:
        s.execute(
            update(AppTask)
            .where(AppTask.id == task_id)
            .values(status="failed", attempts=3, last_error="SMTP 451 try later")
        )
        s.commit()
    with db.session() as s:
        view = describe_task(s, task_id)
    assert (view.status, view.attempts, view.max_attempts, view.priority) == ("failed", 3, 3, 7)
    assert view.recipients == ("new@example.com", "copy@example.com")
    assert view.template == "registration_expiry_warning"
    assert view.last_error == "SMTP 451 try later"
    assert view.next_attempt_at == NOW
    assert view.delivered is None
    assert view.omitted == ("confirmation_link",)
    assert "SECRET-TOKEN" not in repr(view)
    assert view.context["display_name"] == "New User"


def test_show_reports_delivered_recipients_and_unreadable_payloads(db: Database) -> None:
    partly = _row(
        db,
        payload={
            "template": "generic",
            "to": ["a@x.org", "b@x.org", "c@x.org"],
            "delivered_to": ["a@x.org"],
            "refused": ["c@x.org"],
        },
    )
    broken = _row(db, payload=["not", "an", "object"])
    with db.session() as s:
        assert describe_task(s, partly).delivered == ("a@x.org",)
        assert describe_task(s, partly).refused == ("c@x.org",)
        view = describe_task(s, broken)
    assert view.payload_error == "payload is a JSON list, not an object"
    assert view.recipients == ()


def test_show_of_an_unknown_row_is_a_lookup_error(db: Database) -> None:
    with db.session() as s, pytest.raises(LookupError, match="no outbox row with id 42"):
        describe_task(s, 42)
