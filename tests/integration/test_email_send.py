"""EmailSendJob's logic against a real database and a real SMTP server."""

from __future__ import annotations

import logging
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from backjobs.jobs.email_send import EmailSendResult, EmailServerUnavailable
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.outbox_mail import row
from tests.support.smtp import SENDER, SmtpServer

NOW = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)


def enqueue(db: Database, to: str | list[str], *, template: str = "generic", **kw: Any) -> int:
    context = kw.pop("context", {"subject": f"For {to}", "body": "Hello\n\nWorld"})
    with db.session() as s:
        kw.setdefault("now", NOW)
        task_id = enqueue_email(s, to=to, template=template, context=context, **kw)
        s.commit()
    return task_id


def run(db: Database, *, now: datetime = NOW) -> EmailSendResult:
    return drain(db, now=now)


def message_id_of(db: Database, task_id: int) -> str:
    payload = row(db, task_id).payload
    assert payload is not None
    return str(payload["message_id"])


def test_delivers_text_and_html_with_message_id(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    task_id = enqueue(smtp_env, ["a@example.com", "b@example.com"])
    before = datetime.now(UTC)
    assert run(smtp_env) == EmailSendResult(sent=1)
    [received] = smtp_server.messages
    assert received.rcpt_tos == ("a@example.com", "b@example.com")
    assert received.mail_from == SENDER
    message = received.message
    payload = row(smtp_env, task_id).payload
    assert payload is not None
    assert message["Message-ID"] == payload["message_id"]
    assert re.fullmatch(r"<[0-9a-f]{32}@backjobs\.test>", payload["message_id"])
    assert message["Subject"] == "For ['a@example.com', 'b@example.com']"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and "Hello" in text.get_content()
    assert html is not None and "<p>Hello</p>" in html.get_content()
    task = row(smtp_env, task_id)
    assert (task.status, task.locked_until, task.attempts) == ("completed", None, 1)
    # The real time of sending (as_of is 2030), in the row and in the Date: header.
    assert task.completed_at is not None
    assert before <= task.completed_at <= datetime.now(UTC)
    assert before - timedelta(seconds=1) <= message["Date"].datetime <= datetime.now(UTC)


def test_sent_confirmation_link_is_cleared_from_the_payload(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    link = "https://app.example.com/confirm?token=SECRET123"
    context = {
        "display_name": "<script>x</script>",
        "confirmation_link": link,
        "expires_at": NOW + timedelta(days=2),
    }
    task_id = enqueue(
        smtp_env, "u@example.com", template="registration_expiry_warning", context=context
    )
    assert run(smtp_env).sent == 1
    html = smtp_server.messages[0].message.get_body(preferencelist=("html",))
    assert html is not None
    assert link in html.get_content() and "&lt;script&gt;" in html.get_content()
    payload = row(smtp_env, task_id).payload
    assert payload is not None and payload["context"]["confirmation_link"] is None
    assert "SECRET123" not in str(payload)


def test_sends_higher_priority_first_then_oldest(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKJOBS_EMAIL_CONNECTIONS", "1")
    monkeypatch.setenv("BACKJOBS_EMAIL_BATCH_SIZE", "2")
    get_settings.cache_clear()
    for address, priority in [
        ("low1@x.com", 0),
        ("high@x.com", 5),
        ("low2@x.com", 0),
        ("mid@x.com", 1),
    ]:
        enqueue(smtp_env, address, priority=priority)
    assert run(smtp_env).sent == 4
    order = [received.rcpt_tos[0] for received in smtp_server.messages]
    assert order == ["high@x.com", "mid@x.com", "low1@x.com", "low2@x.com"]


def test_transient_failure_retries_later_with_the_same_message_id(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    now = datetime.now(UTC)
    smtp_server.answer("slow@example.com", 451)
    task_id = enqueue(smtp_env, "slow@example.com", now=now)
    assert run(smtp_env, now=now) == EmailSendResult(retried=1, waiting=1)
    task = row(smtp_env, task_id)
    assert (task.status, task.attempts) == ("pending", 1)
    assert task.last_error is not None and "451" in task.last_error
    assert task.next_attempt_at is not None
    # Attempt 1, base 60 s, equal jitter: 30 to 60 s after the failure (real clock).
    assert now + timedelta(seconds=30) <= task.next_attempt_at <= now + timedelta(seconds=75)
    assert not smtp_server.messages
    assert run(smtp_env, now=now + timedelta(seconds=20)).sent == 0  # not due yet
    assert run(smtp_env, now=now + timedelta(minutes=2)) == EmailSendResult(sent=1)
    payload = row(smtp_env, task_id).payload
    assert payload is not None
    assert smtp_server.message_ids() == [payload["message_id"]]
    task = row(smtp_env, task_id)
    assert (task.status, task.last_error) == ("completed", None)  # the old error is cleared


def test_permanent_failure_is_recorded_with_the_reason(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    smtp_server.answer("gone@example.com", 550, times=None)
    bad = enqueue(smtp_env, "gone@example.com")
    good = enqueue(smtp_env, "fine@example.com")
    before = datetime.now(UTC)
    assert run(smtp_env) == EmailSendResult(sent=1, failed=1)
    task = row(smtp_env, bad)
    assert task.status == "failed"
    # When it ended, on the real clock (the run's as_of is years away): retention and
    # `outbox status` count from it.
    assert task.completed_at is not None and before <= task.completed_at <= datetime.now(UTC)
    assert task.last_error is not None
    assert "all recipients refused" in task.last_error and "550" in task.last_error
    assert row(smtp_env, good).status == "completed"


@pytest.mark.parametrize(("code", "status"), [(451, "pending"), (554, "failed")])
def test_refusal_at_end_of_data_is_classified(
    smtp_env: Database,
    smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    status: str,
) -> None:
    monkeypatch.setenv("BACKJOBS_EMAIL_CONNECTIONS", "1")
    get_settings.cache_clear()
    smtp_server.handler.data_answers.append(code)
    first = enqueue(smtp_env, "first@example.com")
    second = enqueue(smtp_env, "second@example.com")
    result = run(smtp_env)
    assert (result.sent, result.retried + result.failed) == (1, 1)
    task = row(smtp_env, first)
    assert task.status == status
    assert task.last_error is not None and task.last_error.startswith(f"SMTP {code}")
    assert (task.completed_at is None) == (status == "pending")
    assert row(smtp_env, second).status == "completed"


def test_partial_refusal_completes_with_a_note(smtp_env: Database, smtp_server: SmtpServer) -> None:
    smtp_server.answer("gone@example.com", 550, times=None)
    task_id = enqueue(smtp_env, ["gone@example.com", "fine@example.com"])
    assert run(smtp_env).sent == 1
    assert smtp_server.messages[0].rcpt_tos == ("fine@example.com",)
    task = row(smtp_env, task_id)
    assert task.status == "completed"
    assert task.last_error is not None and "gone@example.com: 550" in task.last_error


def test_attempts_exhausted_fails_the_row(smtp_env: Database, smtp_server: SmtpServer) -> None:
    smtp_server.answer("busy@example.com", 451, times=None)
    task_id = enqueue(smtp_env, "busy@example.com", max_attempts=2)
    assert run(smtp_env).retried == 1
    assert run(smtp_env, now=NOW + timedelta(hours=1)) == EmailSendResult(failed=1)
    task = row(smtp_env, task_id)
    assert (task.status, task.attempts) == ("failed", 2)
    assert task.last_error is not None and task.last_error.startswith("attempts exhausted (2)")


@pytest.mark.parametrize(
    "payload",
    [
        None,
        ["not", "an", "object"],
        {"template": "generic", "to": ["a@example.com"]},
        {"template": "gone", "to": ["a@example.com"], "context": {}},
        {"template": "generic", "to": ["a@example.com"], "context": {"subject": "no body"}},
        {"template": "generic", "to": "bad\naddress", "context": {"subject": "s", "body": "b"}},
    ],
)
def test_malformed_payload_fails_without_stopping_others(
    smtp_env: Database, smtp_server: SmtpServer, payload: Any
) -> None:
    before = enqueue(smtp_env, "before@example.com")
    with smtp_env.session() as s:
        values = {"task_type": "email_send", "payload": payload, "next_attempt_at": NOW}
        bad = s.execute(insert(AppTask).values(values).returning(AppTask.id)).scalar_one()
        s.commit()
    after = enqueue(smtp_env, "after@example.com")
    assert run(smtp_env) == EmailSendResult(sent=2, failed=1)
    task = row(smtp_env, bad)
    assert task.status == "failed"
    assert task.last_error is not None and task.last_error.startswith("payload does not render")
    assert {row(smtp_env, before).status, row(smtp_env, after).status} == {"completed"}


def test_lapsed_lease_is_sent_again_and_a_live_one_is_not(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    lapsed = enqueue(smtp_env, "lapsed@example.com")
    live = enqueue(smtp_env, "live@example.com")
    real = datetime.now(UTC)  # leases are on the real clock, whatever the as_of
    with smtp_env.session() as s:
        for task_id, until in [(lapsed, real - timedelta(seconds=1)), (live, real + timedelta(1))]:
            task = s.get_one(AppTask, task_id)
            task.status, task.locked_until, task.attempts = "processing", until, 1
        s.commit()
    assert run(smtp_env) == EmailSendResult(sent=1)
    assert smtp_server.message_ids() == [message_id_of(smtp_env, lapsed)]
    assert (row(smtp_env, lapsed).attempts, row(smtp_env, live).status) == (2, "processing")


def test_a_row_that_keeps_killing_its_sender_runs_out_of_attempts(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    task_id = enqueue(smtp_env, "poison@example.com", max_attempts=3)
    with smtp_env.session() as s:
        task = s.get_one(AppTask, task_id)
        real = datetime.now(UTC)
        task.status, task.locked_until, task.attempts = "processing", real - timedelta(1), 3
        s.commit()
    assert run(smtp_env) == EmailSendResult(failed=1)
    task = row(smtp_env, task_id)
    assert (task.status, task.attempts) == ("failed", 4)
    assert task.last_error == "attempts exhausted (earlier sends never finished)"
    assert smtp_server.messages == []


def test_unreachable_server_fails_the_run_and_uses_no_attempt(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKJOBS_SMTP_PORT", "1")  # nothing listens there
    monkeypatch.setenv("BACKJOBS_EMAIL_CONNECTIONS", "1")
    monkeypatch.setenv("BACKJOBS_EMAIL_BATCH_SIZE", "2")
    get_settings.cache_clear()
    ids = [enqueue(smtp_env, f"user{i}@example.com") for i in range(5)]
    # Six runs during an outage: each fails loudly, what it claimed (its first claim, one
    # email per connection while the pace is unknown) goes back, and no row loses an
    # attempt (issue 8, case 4).
    for _ in range(6):
        with pytest.raises(EmailServerUnavailable, match="Connection refused") as caught:
            run(smtp_env)
        partial = caught.value.partial_result
        assert (partial.sent, partial.failed, partial.due_now) == (0, 0, 5)
        # What ops read: the transport, then the server's words.
        assert str(caught.value).startswith(
            f"email transport unavailable: cannot open SMTP session with "
            f"{smtp_server.host}:1: ConnectionRefusedError"
        ), caught.value
        assert str(caught.value).endswith("(1 emails handed back untried, no attempt used)")
        assert partial.released == 1
    rows = [row(smtp_env, task_id) for task_id in ids]
    assert {(t.status, t.attempts, t.locked_until, t.next_attempt_at) for t in rows} == {
        ("pending", 0, None, NOW)
    }
    monkeypatch.setenv("BACKJOBS_SMTP_PORT", str(smtp_server.port))
    get_settings.cache_clear()
    assert run(smtp_env) == EmailSendResult(sent=5)


@pytest.mark.parametrize(("password", "delivered"), [("s3cret-pw", True), ("wrong-pw", False)])
def test_smtp_login_never_shows_the_password(
    app_env: Database,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    password: str,
    delivered: bool,
) -> None:
    with SmtpServer(credentials=("mailer", "s3cret-pw")) as server:
        env = {"TRANSPORT": "smtp", "FROM": SENDER}
        for key, value in env.items():
            monkeypatch.setenv(f"BACKJOBS_EMAIL_{key}", value)
        for key, value in {
            "HOST": server.host,
            "PORT": str(server.port),
            "USERNAME": "mailer",
            "PASSWORD": password,
        }.items():
            monkeypatch.setenv(f"BACKJOBS_SMTP_{key}", value)
        get_settings.cache_clear()
        task_id = enqueue(app_env, "a@example.com")
        with caplog.at_level(logging.DEBUG):
            try:
                result = run(app_env)
                error = ""
            except EmailServerUnavailable as exc:  # bad credentials: the server's refusal
                result, error = exc.partial_result, str(exc)
    assert (result.sent, len(server.messages), server.logins) == (
        (1, 1, ["mailer"]) if delivered else (0, 0, [])
    )
    task = row(app_env, task_id)
    assert password not in caplog.text and password not in error
    assert password not in repr(get_settings())
    if not delivered:
        assert "535" in error
        assert (task.status, task.attempts, task.last_error) == ("pending", 0, None)


BUDGET, SMTP_TIMEOUT, SLOW = 3.0, 5.0, 1.0  # seconds; the sink takes SLOW per message


def slow_outbox(db: Database, server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """40 due emails, a server that takes SLOW s a message, two connections."""
    monkeypatch.setenv("BACKJOBS_EMAIL_TIME_BUDGET_SECONDS", str(BUDGET))
    monkeypatch.setenv("BACKJOBS_SMTP_TIMEOUT_SECONDS", str(SMTP_TIMEOUT))
    monkeypatch.setenv("BACKJOBS_EMAIL_CONNECTIONS", "2")
    get_settings.cache_clear()
    server.handler.data_delay = SLOW
    return [enqueue(db, f"user{i}@example.com") for i in range(40)]


def untouched(db: Database, ids: list[int]) -> list[int]:
    """The ids among ``ids`` still pending, due as enqueued, with no attempt used."""
    with db.session() as s:
        rows = [s.get_one(AppTask, i) for i in ids]
        return [
            r.id
            for r in rows
            if (r.status, r.attempts, r.locked_until, r.claim_token) == ("pending", 0, None, None)
            and r.next_attempt_at == NOW
        ]


def test_the_time_budget_bounds_the_run_and_hands_back_the_rest(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19, item 3: claims sized by the pace, no send after the budget.

    Before, the first claim took a whole batch (40 here) and sent it: 20 s for a 3 s budget.
    """
    ids = slow_outbox(smtp_env, smtp_server, monkeypatch)
    started = time.monotonic()
    result = run(smtp_env)
    elapsed = time.monotonic() - started
    assert elapsed <= BUDGET + SMTP_TIMEOUT, elapsed
    assert 2 <= result.sent < 40 and result.failed == result.retried == 0
    assert len(smtp_server.messages) == result.sent
    # Every email not sent is pending as it was: due, no attempt used, no lease.
    left = untouched(smtp_env, ids)
    assert len(left) == 40 - result.sent == result.due_now
    # Claimed no more than the pace allowed: what it handed back is at most a few.
    assert result.released <= 4, result


class Stopped(BaseException):
    """What Prefect's TerminationSignal is to the job: a BaseException in its thread."""


def test_a_stopped_run_records_what_it_sent_and_hands_back_the_rest(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17, item 9: cancelled mid-send, no row is left leased or with an attempt used."""
    ids = slow_outbox(smtp_env, smtp_server, monkeypatch)
    monkeypatch.setenv("BACKJOBS_EMAIL_TIME_BUDGET_SECONDS", "90")
    get_settings.cache_clear()

    def stop(signum: int, frame: object) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 2.5)  # while the second claim is being sent
    try:
        with pytest.raises(Stopped):
            run(smtp_env)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with smtp_env.session() as s:
        rows = {i: s.get_one(AppTask, i) for i in ids}
        completed = {i for i, r in rows.items() if r.status == "completed"}
        assert {r.status for r in rows.values()} <= {"completed", "pending"}
    # What the server took is recorded as sent (never sent again), and only that.
    assert completed
    taken = sorted(message_id_of(smtp_env, i) for i in completed)
    assert sorted(smtp_server.message_ids()) == taken
    assert sorted(untouched(smtp_env, ids)) == sorted(set(ids) - completed)


def test_pickup_folder_gets_one_eml_per_task(
    app_env: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [enqueue(app_env, f"user{i}@example.com") for i in range(3)]
    assert run(app_env).sent == 3
    folder = tmp_path / "mail"
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted(f"{message_id_of(app_env, i).strip('<>')}.eml" for i in ids)
    content = (folder / names[0]).read_bytes()
    assert b"Message-ID: <" in content and b"text/html" in content
