"""EmailSendJob as Prefect runs it: the real flow, settings from the environment."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from backjobs.jobs.email_send import EmailSendResult, EmailServerUnavailable
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import get_settings
from flows.email_send import email_send_job
from tests.support.databases import Database
from tests.support.smtp import SmtpServer

pytestmark = pytest.mark.usefixtures("prefect_harness")

AS_OF = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)


def test_flow_sends_the_outbox_and_reports_counts(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    smtp_server.answer("gone@example.com", 550, times=None)
    with smtp_env.session() as s:
        good = enqueue_email(
            s,
            to="a@example.com",
            template="generic",
            context={"subject": "Hi", "body": "Hello"},
            now=AS_OF,
        )
        bad = enqueue_email(
            s,
            to="gone@example.com",
            template="generic",
            context={"subject": "Hi", "body": "Hello"},
            now=AS_OF,
        )
        s.commit()
    state = email_send_job(as_of=AS_OF, return_state=True)
    assert state.is_completed()  # a failed email is the row's failure, not the run's
    assert state.result() == EmailSendResult(sent=1, failed=1)
    with smtp_env.session() as s:
        payload = s.get_one(AppTask, good).payload
        assert payload is not None
    assert smtp_server.message_ids() == [payload["message_id"]]
    with smtp_env.session() as s:
        assert s.get_one(AppTask, good).status == "completed"
        assert s.get_one(AppTask, bad).status == "failed"


def test_flow_with_nothing_due_sends_nothing(smtp_env: Database, smtp_server: SmtpServer) -> None:
    assert email_send_job(as_of=AS_OF) == EmailSendResult()
    assert smtp_server.messages == []


def test_unreachable_server_fails_the_run_once_with_the_reason(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8, cases 1 and 4: the run fails loudly, the task is not retried, rows wait."""
    monkeypatch.setenv("BACKJOBS_SMTP_PORT", "1")  # nothing listens there
    get_settings.cache_clear()
    with smtp_env.session() as s:
        task_id = enqueue_email(
            s, to="a@example.com", template="generic", context={"subject": "Hi", "body": "x"},
            now=AS_OF,
        )  # fmt: skip
        s.commit()
    started = time.monotonic()
    state = email_send_job(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    with pytest.raises(EmailServerUnavailable, match="Connection refused"):
        state.result()
    # DB_TASK_OPTIONS retries after ~2, 4, 8 s: a server fault is not retried.
    assert time.monotonic() - started < 5
    with smtp_env.session() as s:
        task = s.get_one(AppTask, task_id)
        assert (task.status, task.attempts) == ("pending", 0)
