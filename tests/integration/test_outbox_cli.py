"""``backjobs outbox status | retry | show`` as an operator types them, on a SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from tests.support.databases import Database

pytestmark = pytest.mark.slow  # every test runs the backjobs command as a process

BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
SECRET_LINK = "https://app.example/confirm?token=SECRET-TOKEN"


@pytest.fixture
def outbox(sqlite_db: Database) -> Database:
    return sqlite_db


def backjobs(db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    # From the test's own empty folder, with no BACKJOBS_* but the database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKJOBS_")}
    env["BACKJOBS_DATABASE_URL"] = db.url
    return subprocess.run(
        [BACKJOBS, "outbox", *args],
        cwd=Path.cwd(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _row(db: Database, **values: Any) -> int:
    defaults: dict[str, Any] = {
        "task_type": "email_send",
        "payload": {"template": "generic", "to": ["a@example.com"], "context": {}},
        "created_at": LONG_AGO,
        "next_attempt_at": LONG_AGO,
    }
    with db.session() as s:
        task = AppTask(**(defaults | values))
        s.add(task)
        s.commit()
        return task.id


def _status_of(db: Database, task_id: int) -> tuple[str, int]:
    with db.session() as s:
        task = s.execute(select(AppTask).where(AppTask.id == task_id)).scalar_one()
        return task.status, task.attempts


def test_status_prints_the_counts(outbox: Database) -> None:
    _row(outbox, status="pending")
    _row(outbox, status="pending", next_attempt_at=datetime(2999, 1, 1, tzinfo=UTC))
    _row(outbox, status="failed", next_attempt_at=datetime.now(UTC) - timedelta(hours=1))
    _row(outbox, status="completed", completed_at=LONG_AGO)
    done = backjobs(outbox, "status")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    assert lines["pending"] == "2" and lines["failed"] == "1" and lines["completed"] == "1"
    assert lines["due_now"] == "1" and lines["waiting_retry"] == "1"
    assert lines["failed_last_24h"] == "1"
    assert int(lines["oldest_due_age_seconds"]) > 365 * 24 * 3600


def test_retry_by_id_puts_failed_rows_back_and_logs_each(outbox: Database) -> None:
    first = _row(outbox, status="failed", attempts=5, last_error="SMTP 550 no such user")
    second = _row(outbox, status="failed", attempts=3)
    done = backjobs(outbox, "retry", "--id", str(first), str(second))
    assert done.returncode == 0, done.stderr
    assert f"retried 2 outbox row(s): {first}, {second}" in done.stdout
    assert f"outbox task {first}: failed -> pending" in done.stderr
    assert f"outbox task {second}: failed -> pending" in done.stderr
    assert _status_of(outbox, first) == ("pending", 0)
    assert _status_of(outbox, second) == ("pending", 0)


def test_retry_refuses_a_row_that_is_not_failed(outbox: Database) -> None:
    failed = _row(outbox, status="failed", attempts=5)
    pending = _row(outbox, status="pending", attempts=1)
    done = backjobs(outbox, "retry", "--id", str(failed), str(pending))
    assert done.returncode == 2
    assert f"app_tasks id {pending}: status is pending" in done.stderr
    assert "nothing retried" in done.stderr
    assert _status_of(outbox, failed) == ("failed", 5)


def test_retry_failed_since(outbox: Database) -> None:
    recent = _row(
        outbox, status="failed", attempts=5, completed_at=datetime(2029, 6, 1, tzinfo=UTC)
    )
    old = _row(outbox, status="failed", attempts=5)
    done = backjobs(outbox, "retry", "--failed-since", "2029-01-01T00:00:00Z")
    assert done.returncode == 0, done.stderr
    assert f"retried 1 outbox row(s): {recent}" in done.stdout
    assert _status_of(outbox, old) == ("failed", 5)
    again = backjobs(outbox, "retry", "--failed-since", "2029-01-01T00:00:00Z")
    assert again.returncode == 0 and "no failed outbox rows to retry" in again.stdout


def test_retry_needs_ids_or_a_valid_time(outbox: Database) -> None:
    neither = backjobs(outbox, "retry")
    assert neither.returncode == 2 and "--id" in neither.stderr
    bad = backjobs(outbox, "retry", "--failed-since", "yesterday")
    assert bad.returncode == 2
    assert "--failed-since 'yesterday' is not an ISO-8601 date-time" in bad.stderr


def test_show_prints_the_row_but_never_its_secrets(outbox: Database) -> None:
    with outbox.session() as s:
        task_id = enqueue_email(
            s,
            to=["new@example.com"],
            template="registration_expiry_warning",
            context={
                "display_name": "New User",
                "confirmation_link": SECRET_LINK,
                "expires_at": datetime(2030, 1, 3, tzinfo=UTC),
            },
            priority=4,
            now=datetime(2030, 1, 1, tzinfo=UTC),
        )
        s.commit()
    done = backjobs(outbox, "show", str(task_id))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"outbox row {task_id}" in out
    assert "status           pending" in out
    assert "attempts         0 of 5" in out
    assert "priority         4" in out
    assert "recipients       new@example.com" in out
    assert "context.display_name New User" in out
    assert "context.confirmation_link (sensitive, not shown)" in out
    assert "SECRET-TOKEN" not in out + done.stderr
    assert "<html" not in out.lower()


def test_show_never_prints_the_body(outbox: Database) -> None:
    with outbox.session() as s:
        task_id = enqueue_email(
            s, to="a@example.com", template="generic", context={"subject": "Hi", "body": "PRIVATE"}
        )
        s.commit()
    done = backjobs(outbox, "show", str(task_id))
    assert done.returncode == 0, done.stderr
    assert "context.subject  Hi" in done.stdout
    assert "context.body     (7 characters, not shown)" in done.stdout
    assert "PRIVATE" not in done.stdout


def test_show_of_an_unknown_row_says_so(outbox: Database) -> None:
    done = backjobs(outbox, "show", "12345")
    assert done.returncode == 2
    assert "no outbox row with id 12345" in done.stderr


def test_an_unmigrated_database_is_named_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.db").write_bytes(b"")  # an empty SQLite database
    empty = Database("sqlite", f"sqlite:///{tmp_path}/empty.db", engine=None)  # type: ignore[arg-type]
    done = backjobs(empty, "status")
    assert done.returncode == 2
    assert f"cannot read the outbox in database sqlite:///{tmp_path}/empty.db" in done.stderr
    assert "not migrated: run `backjobs db upgrade`" in done.stderr
    assert "Traceback" not in done.stderr
