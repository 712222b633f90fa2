"""EmailSendJob as Prefect runs it: the real flow, settings from the environment."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.logging.handlers import APILogHandler

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
    # ... but the run says so: not a plain "Completed" (issue 17, item 5).
    assert state.name == "Completed with problems"
    assert state.message == "email-send-job: failed=1 (the reasons are in the run's logs)"
    assert state.result() == EmailSendResult(sent=1, failed=1)
    with smtp_env.session() as s:
        payload = s.get_one(AppTask, good).payload
        assert payload is not None
    assert smtp_server.message_ids() == [payload["message_id"]]
    with smtp_env.session() as s:
        assert s.get_one(AppTask, good).status == "completed"
        assert s.get_one(AppTask, bad).status == "failed"
    # What ops see: the queue after the run, and why the run was not all green.
    run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # sends every queued log
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    queue = {a.key: json.loads(str(a.data)) for a in artifacts}["email-send-job-queue"]
    shown = {row["count"]: row["value"] for row in queue}
    assert shown["pending"] == "0" and shown["due_now"] == "0"
    assert shown["failed_last_24h"] == "1" and shown["oldest_due_age_seconds"] == "none"
    messages = [log.message for log in logs]
    assert any(f"{bad}" in m and "550" in m for m in messages if "failed" in m), messages
    warned = "[EmailSendJob] Job completed with problems: failed=1"
    assert any(warned in m for m in messages), messages


def final_task_runs(flow_run_id: UUID, name: str, timeout: float = 30) -> list[TaskRun]:
    """The runs of task ``name`` in the flow run, once the server holds each in a final state
    (the client reports task states as events, recorded a moment later)."""
    flows = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [
                run
                for run in client.read_task_runs(flow_run_filter=flows)
                if run.name.startswith(f"{name}-")
            ]
            if runs and all(run.state is not None and run.state.is_final() for run in runs):
                return runs
            if time.monotonic() > deadline:
                pytest.fail(f"task runs {name} of flow run {flow_run_id} not final: {runs}")
            time.sleep(0.2)


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
    state = email_send_job(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    with pytest.raises(EmailServerUnavailable, match="Connection refused"):
        state.result()
    # DB_TASK_OPTIONS retries a task 3 times: a server fault is not retried, the send ran
    # once (as the server recorded it, not as a stopwatch says: a loaded machine is slow).
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    [send] = final_task_runs(run_id, "send_due_emails")
    assert (send.state_name, send.run_count) == ("Failed", 1)
    with smtp_env.session() as s:
        task = s.get_one(AppTask, task_id)
        assert (task.status, task.attempts) == ("pending", 0)
