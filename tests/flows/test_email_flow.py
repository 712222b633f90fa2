"""EmailSendJob as Prefect runs it: the real flow, settings from the environment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from backjobs.jobs.email_send import EmailSendResult
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
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
    assert state.result() == EmailSendResult(sent=1, retried=0, failed=1, left=0)
    assert smtp_server.message_ids() == [f"<app-task-{good}@backjobs.test>"]
    with smtp_env.session() as s:
        assert s.get_one(AppTask, good).status == "completed"
        assert s.get_one(AppTask, bad).status == "failed"


def test_flow_with_nothing_due_sends_nothing(smtp_env: Database, smtp_server: SmtpServer) -> None:
    assert email_send_job(as_of=AS_OF) == EmailSendResult(sent=0, retried=0, failed=0, left=0)
    assert smtp_server.messages == []
