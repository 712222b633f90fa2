"""End to end: how an email-send-job run ends when its worker dies, when it is cancelled,
and when its time budget runs out (issue 19, items 2 and 3; issue 17, item 9).

One Prefect server for the module; email-send-job deployed from prefect.yaml with its
``*/2`` schedule paused (so only the runs the tests create execute); a real process
worker per test (each needs its own settings, and one is killed); an aiosmtpd sink in the
test process that takes a set time per message.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from tests.support.databases import Database
from tests.support.prefect_api import call_json
from tests.support.prefect_server import PrefectServer
from tests.support.smtp import SENDER, SmtpServer

pytestmark = pytest.mark.slow

DEPLOYMENT = "email-send-job/email-send-job"


@pytest.fixture(scope="module")
def deployment_id(prefect_server: PrefectServer) -> str:
    """email-send-job deployed, its schedule paused and its scheduled runs gone."""
    server = prefect_server
    server.create_pool("backjobs")
    server.prefect("--no-prompt", "deploy", "--name", "email-send-job")
    deployment = server.api(f"deployments/name/{DEPLOYMENT}")
    for schedule in deployment["schedules"]:
        url = f"{server.api_url}/deployments/{deployment['id']}/schedules/{schedule['id']}"
        call_json("PATCH", url, body={"active": False})
    scheduled = server.api(
        "flow_runs/filter",
        {
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        },
    )
    for run in scheduled:
        call_json("DELETE", f"{server.api_url}/flow_runs/{run['id']}")
    return str(deployment["id"])


@pytest.fixture(autouse=True)
def own_worker(prefect_server: PrefectServer) -> Iterator[None]:
    """Each test's worker (with its settings) is stopped when the test ends."""
    yield
    prefect_server.stop_workers()


def worker_env(db: Database, smtp: SmtpServer, tmp_path: Path, **settings: str) -> dict[str, str]:
    return {
        "BACKJOBS_DATABASE_URL": db.url,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path / "files"),
        "BACKJOBS_EMAIL_TRANSPORT": "smtp",
        "BACKJOBS_SMTP_HOST": smtp.host,
        "BACKJOBS_SMTP_PORT": str(smtp.port),
        "BACKJOBS_EMAIL_FROM": SENDER,
        "BACKJOBS_EMAIL_CONNECTIONS": "2",
        **{f"BACKJOBS_{key.upper()}": value for key, value in settings.items()},
    }


def enqueue(db: Database, count: int) -> list[int]:
    at = datetime.now(UTC)  # due now: the ad hoc run's as_of is its creation time
    with db.session() as s:
        ids = [
            enqueue_email(
                s,
                to=f"user{i}@example.com",
                template="generic",
                context={"subject": f"Hello {i}", "body": "Hello"},
                now=at,
            )
            for i in range(count)
        ]
        s.commit()
    return ids


def start_run(server: PrefectServer, deployment_id: str) -> str:
    run = server.api(f"deployments/{deployment_id}/create_flow_run", {})
    return str(run["id"])


def wait_for(what: str, condition: Any, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def rows(db: Database, ids: list[int]) -> list[AppTask]:
    with db.session() as s:
        return [s.get_one(AppTask, i) for i in ids]


def artifact_keys(server: PrefectServer, run_id: str) -> set[str]:
    found = server.api("artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"] for a in found}


def log_messages(server: PrefectServer, run_id: str) -> list[str]:
    return [log["message"] for log in server.logs_of(run_id)]


def test_a_run_whose_worker_is_killed_finishes_completed_with_its_artifact(
    prefect_server: PrefectServer,
    deployment_id: str,
    sqlite_db: Database,
    smtp_server: SmtpServer,
    tmp_path: Path,
) -> None:
    """Issue 19, item 2: before, the orphan's next console line raised SystemExit(1)
    (rich, on the broken pipe) and the run Crashed after it had sent everything."""
    server = prefect_server
    ids = enqueue(sqlite_db, 20)
    smtp_server.handler.data_delay = 0.5  # 20 emails on 2 connections: ≈ 5 s of sending
    worker = server.start_worker(
        "backjobs", env=worker_env(sqlite_db, smtp_server, tmp_path), log=tmp_path / "worker.log"
    )
    run_id = start_run(server, deployment_id)
    try:
        wait_for("the run sending", lambda: len(smtp_server.messages) >= 2)
        os.kill(worker.pid, signal.SIGKILL)  # the worker only: its flow-run process goes on
        worker.wait(timeout=10)
        run = server.wait_until_final([run_id], timeout=180)[run_id]
    finally:
        try:  # the orphan, should it still be there: it is in the worker's process group
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert run["state_type"] == "COMPLETED", (run["state_name"], run["state"]["message"])
    assert run["state_name"] == "Completed"
    assert "email-send-job-result" in artifact_keys(server, run_id)
    assert {t.status for t in rows(sqlite_db, ids)} == {"completed"}
    assert len(smtp_server.messages) == 20
    assert not any("Job failed" in m for m in log_messages(server, run_id))


def test_a_cancelled_run_logs_it_and_hands_back_its_claimed_rows(
    prefect_server: PrefectServer,
    deployment_id: str,
    sqlite_db: Database,
    smtp_server: SmtpServer,
    tmp_path: Path,
) -> None:
    """Issue 17, item 9: cancelled mid-send, as the seed logs it; no attempt used."""
    server = prefect_server
    ids = enqueue(sqlite_db, 60)
    smtp_server.handler.data_delay = 1.0  # 60 emails on 2 connections: ≈ 30 s of sending
    server.start_worker(
        "backjobs", env=worker_env(sqlite_db, smtp_server, tmp_path), log=tmp_path / "worker.log"
    )
    run_id = start_run(server, deployment_id)
    wait_for("the run sending", lambda: len(smtp_server.messages) >= 2)
    server.prefect("flow-run", "cancel", run_id)
    run = server.wait_until_final([run_id], timeout=120)[run_id]
    assert run["state_type"] == "CANCELLED", (run["state_name"], run["state"]["message"])
    wait_for(
        "the cancellation logged",
        lambda: any("[EmailSendJob] Job was cancelled" in m for m in log_messages(server, run_id)),
        timeout=30,
    )
    tasks = rows(sqlite_db, ids)
    sent = [t for t in tasks if t.status == "completed"]
    assert 2 <= len(sent) < 60 and len(smtp_server.messages) == len(sent)
    # Every other row is pending again, untouched: no lease, no attempt used.
    rest = {(t.status, t.attempts, t.locked_until, t.claim_token) for t in tasks if t not in sent}
    assert rest == {("pending", 0, None, None)}


def test_the_time_budget_bounds_a_run_against_a_slow_server(
    prefect_server: PrefectServer,
    deployment_id: str,
    sqlite_db: Database,
    smtp_server: SmtpServer,
    tmp_path: Path,
) -> None:
    """Issue 19, item 3: before, a claimed batch was sent whole (here 40 emails, ≈ 20 s)."""
    budget, smtp_timeout = 5.0, 5.0
    server = prefect_server
    ids = enqueue(sqlite_db, 40)
    smtp_server.handler.data_delay = 1.0
    env = worker_env(
        sqlite_db,
        smtp_server,
        tmp_path,
        email_time_budget_seconds=str(budget),
        smtp_timeout_seconds=str(smtp_timeout),
    )
    server.start_worker("backjobs", env=env, log=tmp_path / "worker.log")
    run_id = start_run(server, deployment_id)
    run = server.wait_until_final([run_id], timeout=120)[run_id]
    assert run["state_type"] == "COMPLETED", (run["state_name"], run["state"]["message"])
    # A run's last log lines reach the server shortly after its final state.
    wait_for(
        "the run's result logged",
        lambda: any("[EmailSendJob] Result:" in m for m in log_messages(server, run_id)),
        timeout=60,
    )
    logs = server.logs_of(run_id)
    began = next(log for log in logs if "Starting job execution" in log["message"])
    ended = next(log for log in logs if "[EmailSendJob] Result:" in log["message"])
    job_seconds = (
        datetime.fromisoformat(ended["timestamp"]) - datetime.fromisoformat(began["timestamp"])
    ).total_seconds()
    assert job_seconds <= budget + smtp_timeout, job_seconds
    tasks = rows(sqlite_db, ids)
    sent = [t for t in tasks if t.status == "completed"]
    assert 2 <= len(sent) < 40 and len(smtp_server.messages) == len(sent)
    rest = {(t.status, t.attempts, t.locked_until) for t in tasks if t not in sent}
    assert rest == {("pending", 0, None)}
