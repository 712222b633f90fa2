"""EmailSendJob under the faults of a real mail server and a real deployment (issue 8).

Real SQLite and PostgreSQL (``db`` fixtures), a real aiosmtpd server scripted per stage.
Section 1, a refusal of the whole run by the server, is ``test_email_server_refusals.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text

from backjobs.jobs.email_send import EmailSendResult, EmailServerUnavailable
from backjobs.models import AppTask
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.outbox_mail import GENERIC, enqueue, point_at, real_now, row, setenv
from tests.support.smtp import SmtpServer

# --- 2. Leases on the real clock, renewed while sending; ownership by token ------------


def in_thread(db: Database, *, now: datetime) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(drain(db, now=now))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def test_lease_is_renewed_while_a_slow_send_outlives_it(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, case 2a: lease 2 s, a send of 3 s, a second run at 2.5 s: sent once."""
    point_at(monkeypatch, smtp_server, email_lease_seconds=2, email_connections=1)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    task_id = enqueue(db, "slow@example.com")
    smtp_server.handler.data_delay = 3.0
    first, first_out = in_thread(db, now=real_now())
    time.sleep(2.5)
    second = drain(db, now=real_now())
    first.join(timeout=30)
    assert first_out == [EmailSendResult(sent=1)]
    assert (second.sent, second.lost) == (0, 0)
    assert len(smtp_server.messages) == 1
    assert row(db, task_id).status == "completed"


def test_late_run_with_an_old_as_of_never_takes_a_live_lease(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, case 2b: a run 6 min late (as_of = its schedule) beside an ad hoc run."""
    point_at(monkeypatch, smtp_server, email_lease_seconds=300, email_connections=1)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    scheduled = real_now() - timedelta(minutes=6)
    ids = [enqueue(db, f"u{i}@example.com", now=scheduled - timedelta(minutes=1)) for i in range(3)]
    smtp_server.handler.data_delay = 1.0
    late, late_out = in_thread(db, now=scheduled)  # claims first: its lease is real-now + 300
    time.sleep(0.5)
    adhoc, adhoc_out = in_thread(db, now=real_now())
    for thread in (late, adhoc):
        thread.join(timeout=60)
    counts = Counter(m.message_id for m in smtp_server.messages)
    assert len(counts) == 3 and set(counts.values()) == {1}, counts
    results = late_out + adhoc_out
    assert all(isinstance(r, EmailSendResult) for r in results), results
    assert sum(r.sent for r in results) == 3 and sum(r.lost for r in results) == 0
    assert {row(db, i).status for i in ids} == {"completed"}


def test_future_as_of_never_pushes_a_retry_beyond_real_now_plus_backoff(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, case 2: ``--as-of 2030-…`` meeting a 451 must not park the row in 2030."""
    point_at(monkeypatch, smtp_server, email_backoff_base_seconds=60)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    task_id = enqueue(db, "busy@example.com")
    smtp_server.answer("busy@example.com", 451)
    before = real_now()
    assert drain(db, now=datetime(2030, 1, 1, tzinfo=UTC)).retried == 1
    due = row(db, task_id).next_attempt_at
    assert due is not None and before < due <= real_now() + timedelta(seconds=60)
    # A normal run after the backoff sends it.
    assert drain(db, now=due + timedelta(seconds=1)).sent == 1


def test_an_ack_for_a_row_taken_over_is_reported_lost_and_not_written(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner token: a sender whose row was re-claimed does not overwrite the owner."""
    point_at(monkeypatch, smtp_server, email_connections=1)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    task_id = enqueue(db, "a@example.com")
    smtp_server.handler.data_delay = 1.0
    thread, out = in_thread(db, now=real_now())
    time.sleep(0.5)
    with db.session() as s:  # meanwhile another sender owns it (e.g. after a long freeze)
        s.execute(
            text("UPDATE app_tasks SET claim_token = 'other', last_error = 'theirs' WHERE id = :i"),
            {"i": task_id},
        )
        s.commit()
    thread.join(timeout=30)
    [result] = out
    assert isinstance(result, EmailSendResult) and (result.sent, result.lost) == (1, 1)
    task = row(db, task_id)
    assert (task.status, task.claim_token, task.last_error) == ("processing", "other", "theirs")


# --- 3. Partial recipients ---------------------------------------------------------------


def test_temporary_refusal_of_one_recipient_is_retried_to_them_alone(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, smtp_server)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    smtp_server.answer("admin2@example.com", 452)
    smtp_server.answer("gone@example.com", 550, times=None)
    admins = ["admin1@example.com", "admin2@example.com", "gone@example.com"]
    task_id = enqueue(db, admins)
    now = real_now()
    assert drain(db, now=now) == EmailSendResult(retried=1, waiting=1)
    task = row(db, task_id)
    assert (task.status, task.attempts) == ("pending", 1)
    assert task.payload is not None
    assert task.payload["delivered_to"] == ["admin1@example.com"]
    assert task.payload["refused"] == ["gone@example.com"]
    assert task.last_error is not None and "admin2@example.com: 452" in task.last_error
    assert drain(db, now=now + timedelta(minutes=5)) == EmailSendResult(sent=1)
    first, second = smtp_server.messages
    assert first.rcpt_tos == ("admin1@example.com",)
    assert second.rcpt_tos == ("admin2@example.com",)  # only the one still owed
    assert first.message_id == second.message_id == task.payload["message_id"]
    task = row(db, task_id)
    assert task.status == "completed"
    assert task.payload is not None
    assert task.payload["delivered_to"] == ["admin1@example.com", "admin2@example.com"]
    assert task.last_error == "not delivered to: gone@example.com"


# --- 6. A payload that is not JSON -------------------------------------------------------


def test_payload_that_is_not_json_fails_its_row_only(
    sqlite_db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, smtp_server)
    good = enqueue(sqlite_db, "good@example.com")
    with sqlite_db.session() as s:
        bad = s.execute(
            text(
                "INSERT INTO app_tasks (task_type, status, priority, payload, attempts,"
                " max_attempts, next_attempt_at, created_at)"
                " VALUES ('email_send', 'pending', 5, '{not json', 0, 5,"
                " '2000-01-01 00:00:00.000000', '2000-01-01 00:00:00.000000') RETURNING id"
            )
        ).scalar_one()
        s.commit()
    result = drain(sqlite_db, now=real_now())
    assert (result.sent, result.failed) == (1, 1)
    with sqlite_db.engine.connect() as c:
        status, error = c.execute(
            text("SELECT status, last_error FROM app_tasks WHERE id = :i"), {"i": bad}
        ).one()
    assert status == "failed" and "payload is not JSON" in error
    assert row(sqlite_db, good).status == "completed"


# --- 7. What a real MTA showed -------------------------------------------------------------


def test_rows_queued_before_the_stored_message_id_keep_the_old_form(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, smtp_server)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    payload = {"template": "generic", "to": ["old@example.com"], "context": GENERIC}
    with db.session() as s:
        values = {"task_type": "email_send", "payload": payload, "next_attempt_at": real_now()}
        old = s.execute(insert(AppTask).values(values).returning(AppTask.id)).scalar_one()
        s.commit()
    assert drain(db, now=real_now()).sent == 1
    assert smtp_server.message_ids() == [f"<app-task-{old}@backjobs.test>"]


def test_fresh_connection_after_a_run_of_refusals(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postfix slows, then drops, a connection after many errors: reconnect after 5."""
    point_at(monkeypatch, smtp_server, email_connections=1)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    for i in range(12):
        smtp_server.answer(f"nobody{i}@example.com", 550, times=None)
        enqueue(db, f"nobody{i}@example.com")
    result = drain(db, now=real_now())
    assert result.failed == 12
    assert len(smtp_server.handler.sessions) == 3  # 5 refusals, 5 refusals, 2 refusals


def test_secret_fields_are_cleared_when_a_row_fails_for_good(
    db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(monkeypatch, smtp_server)
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    smtp_server.answer("gone@example.com", 550, times=None)
    context = {
        "confirmation_link": "https://app.example.com/confirm?token=SECRET123",
        "expires_at": real_now() + timedelta(days=2),
    }
    task_id = enqueue(
        db, "gone@example.com", template="registration_expiry_warning", context=context
    )
    assert drain(db, now=real_now()).failed == 1
    task = row(db, task_id)
    assert task.status == "failed"
    assert "SECRET123" not in str(task.payload)


@pytest.mark.parametrize("offered", [True, False])
def test_non_ascii_sender_uses_smtputf8_or_fails_the_run_clearly(
    app_env: Database, monkeypatch: pytest.MonkeyPatch, offered: bool
) -> None:
    """Issue 8, case 5: ``jörg@…`` needs SMTPUTF8; ``noreply@bücher.de`` goes as IDNA."""
    with SmtpServer(smtputf8=offered) as server:
        point_at(monkeypatch, server)
        setenv(monkeypatch, email_from="Jörg <jörg@bücher.de>")
        task_id = enqueue(app_env, "a@example.com")
        if offered:
            assert drain(app_env, now=real_now()).sent == 1
            [received] = server.messages
            assert received.mail_from == "jörg@xn--bcher-kva.de"
            assert "jörg@xn--bcher-kva.de" in str(received.message["From"])
        else:
            with pytest.raises(EmailServerUnavailable, match=r"BACKJOBS_EMAIL_FROM.*SMTPUTF8"):
                drain(app_env, now=real_now())
            assert (row(app_env, task_id).status, row(app_env, task_id).attempts) == (
                "pending",
                0,
            )


def test_a_server_that_never_answers_is_its_fault(
    app_env: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout before the message (no greeting) uses no attempt and fails the run."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog; nobody ever speaks
        setenv(
            monkeypatch,
            email_transport="smtp",
            smtp_host="127.0.0.1",
            smtp_port=silent.getsockname()[1],
            smtp_timeout_seconds=0.5,
        )
        task_id = enqueue(app_env, "a@example.com")
        with pytest.raises(EmailServerUnavailable, match="timed out"):
            drain(app_env, now=real_now())
    task = row(app_env, task_id)
    assert (task.status, task.attempts, task.last_error) == ("pending", 0, None)
