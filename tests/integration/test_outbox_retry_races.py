"""``outbox retry`` under races (issue 18): it locks its rows from the check to the update,
so a row deleted meanwhile is refused, never skipped; and it never retries a row whose
secret fields were scrubbed (such a row could never be sent)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text

from backjobs.db import session_scope
from backjobs.models import AppTask
from backjobs.outbox_admin import RetryRefused, retry_failed
from tests.support.databases import Database
from tests.support.registration import ROW_LOCK_WAITS, on_thread, wait_for_lock_waits

NOW = datetime(2030, 1, 10, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
GENERIC = {"template": "generic", "to": ["a@example.com"], "context": {"subject": "s", "body": "b"}}
SCRUBBED = {
    "template": "registration_expiry_warning",
    "to": ["ann@example.com"],
    "context": {
        "display_name": None,
        "confirmation_link": None,
        "expires_at": "2030-01-11T00:00:00Z",
    },
}


def failed_row(db: Database, payload: dict[str, Any]) -> int:
    with db.session() as s:
        task = AppTask(
            task_type="email_send",
            status="failed",
            payload=payload,
            attempts=5,
            next_attempt_at=NOW - 2 * HOUR,
            completed_at=NOW - HOUR,
            last_error="550 no",
        )
        s.add(task)
        s.commit()
        return task.id


def statuses(db: Database) -> dict[int, str]:
    with db.session() as s:
        return {i: st for i, st in s.execute(select(AppTask.id, AppTask.status))}


def test_a_scrubbed_row_is_refused_by_id_and_left_out_since_a_time(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    plain = failed_row(db, GENERIC)
    scrubbed = failed_row(db, SCRUBBED)
    with session_scope(db.engine) as s, pytest.raises(RetryRefused) as refused:
        retry_failed(s, ids=[plain, scrubbed], now=NOW)
    assert refused.value.refused.keys() == {scrubbed}
    assert "confirmation_link was removed when it ended" in str(refused.value)
    assert statuses(db) == {plain: "failed", scrubbed: "failed"}  # nothing applied
    with caplog.at_level(logging.WARNING, logger="backjobs"), session_scope(db.engine) as s:
        assert retry_failed(s, failed_since=NOW - 2 * HOUR, now=NOW) == [plain]
    assert f"outbox task {scrubbed}: not retried: its confirmation_link" in caplog.text
    assert statuses(db) == {plain: "pending", scrubbed: "failed"}


@pytest.mark.postgres
@pytest.mark.parametrize("deleted", ["one", "both"])
def test_a_row_deleted_while_retry_checks_it_is_refused_and_nothing_applied(
    pg_db: Database, deleted: str
) -> None:
    first, second = failed_row(pg_db, GENERIC), failed_row(pg_db, GENERIC)
    gone = [second] if deleted == "one" else [first, second]
    # Retention deletes rows; its transaction is still open while retry runs: the window.
    with pg_db.engine.connect() as retention:
        retention.execute(text("DELETE FROM app_tasks WHERE id = ANY(:ids)"), {"ids": gone})

        def retry() -> list[int]:
            with session_scope(pg_db.engine) as s:
                return retry_failed(s, ids=[first, second], now=NOW)

        thread, outcome = on_thread(retry)
        wait_for_lock_waits(pg_db, events=ROW_LOCK_WAITS, or_done=outcome.done)
        retention.commit()
    thread.join(60)
    assert isinstance(outcome.error, RetryRefused), outcome.error or outcome.value
    assert outcome.error.refused == {i: "no such outbox row" for i in gone}
    assert statuses(pg_db) == {i: "failed" for i in (first, second) if i not in gone}
