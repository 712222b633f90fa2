"""A run whose worker machine dies, end to end (issue 19, items 1 and 4): ``backjobs
dashboard`` with its alert receiver, ``backjobs deploy`` of email-send-job (the real flow,
one run at a time, no schedule), a process worker, an aiosmtpd sink in the test process
that keeps every message and its Message-ID, and a webhook listener on loopback. Beside it,
two jobs on a pool no worker polls, whose runs the test leaves as a dead worker leaves them:
a cleanup-job run taken (Pending) by a worker that died before starting it, and a run of the
expiry job that went Running, then was cancelled from the UI after its machine died.

Its own module (and dashboard): the zombie detector needs about two minutes, which the
other alert tests spend in another test process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from backjobs.db import make_engine, session_scope
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from tests.support.alerts import (
    AlertStack,
    add_admins,
    alerts_of,
    create_pools,
    deploy,
    start_worker,
    stop,
    wait_events,
    wait_final,
    wait_state,
)
from tests.support.dashboard import gated_dashboard, migrated_sqlite
from tests.support.smtp import SENDER, SmtpServer
from tests.support.webhook import WebhookListener

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
JOB = "email-send-job"
STARTLESS = "cleanup-job"  # its run is taken by a worker that dies before starting it
ABANDONED = "expire-unconfirmed-registrations-job"  # cancelled after its machine died
IDLE_POOL = "backjobs-idle"  # no worker polls it: the test plays the worker that died
LEASE_SECONDS = 20  # the dead run's rows are free again long before it is Crashed


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    folder = tmp_path_factory.mktemp("zombie")
    app_db = migrated_sqlite(folder)
    add_admins(app_db)
    project = folder / "project"
    project.mkdir()
    for name in ("flows", "tasks"):
        (project / name).symlink_to(ROOT / name)
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = (JOB, STARTLESS, ABANDONED)
    wanted = {d["name"]: d for d in document["deployments"] if d["name"] in names}
    for deployment in wanted.values():
        deployment.pop("schedules")
        deployment["description"] = "No schedule (triggered only)."
    wanted[STARTLESS]["work_pool"] = wanted[ABANDONED]["work_pool"] = {"name": IDLE_POOL}
    document["deployments"] = [wanted[name] for name in names]
    (project / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    with WebhookListener() as hook:
        extra = {"BACKJOBS_ALERT_WEBHOOK_URL": hook.url}
        with gated_dashboard(folder / "dash", app_db_url=app_db, extra_env=extra) as dash:
            yield AlertStack(dash, hook, app_db, project)


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker_env(
    stack: AlertStack, sink: SmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    env = stack.dash.prefect_env
    create_pools(stack, "backjobs", IDLE_POOL)
    out = deploy(stack, env)
    # The window comes from the heartbeat the pool's template gives the runs (the deploying
    # shell sets none): three heartbeats of 30 s.
    assert (
        f"{JOB}: automation backjobs-{JOB}-zombie created (a Running run is Crashed 90 s after"
        " its last heartbeat, a Pending one as long after its worker took it; heartbeats every"
        " 30 s, from the job template of pool 'backjobs')"
    ) in out, out
    return env | {
        "BACKJOBS_DATABASE_URL": stack.app_db,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path_factory.mktemp("files")),
        "BACKJOBS_EMAIL_TRANSPORT": "smtp",
        "BACKJOBS_SMTP_HOST": sink.host,
        "BACKJOBS_SMTP_PORT": str(sink.port),
        "BACKJOBS_EMAIL_FROM": SENDER,
        "BACKJOBS_EMAIL_CONNECTIONS": "2",
        "BACKJOBS_EMAIL_LEASE_SECONDS": str(LEASE_SECONDS),
    }


def enqueue(app_db: str, count: int) -> list[int]:
    engine = make_engine(app_db)
    try:
        with session_scope(engine) as session:
            return [
                enqueue_email(
                    session,
                    to=f"user{i}@example.com",
                    template="generic",
                    context={"subject": f"Hello {i}", "body": "Hello"},
                    now=datetime.now(UTC),
                )
                for i in range(count)
            ]
    finally:
        engine.dispose()


def outbox(app_db: str) -> dict[int, tuple[str, str, str]]:
    """Every outbox row: id -> (status, its stored Message-ID, the alert's kind or "")."""
    engine = make_engine(app_db)
    try:
        with session_scope(engine) as session:
            found = session.execute(select(AppTask.id, AppTask.status, AppTask.payload)).all()
    finally:
        engine.dispose()
    rows = {}
    for row_id, status, stored in found:
        payload = stored if isinstance(stored, dict) else json.loads(stored)
        kind = payload["context"].get("kind", "") if payload["template"] == "job-alert" else ""
        rows[row_id] = (status, str(payload["message_id"]), kind)
    return rows


def test_a_run_killed_with_its_worker_mid_send_is_crashed_and_the_next_run_sends_all(
    stack: AlertStack, sink: SmtpServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL of the worker and of the run's process while email-send-job sends: Crashed
    within 3 minutes with no command run, its message naming the last heartbeat and the
    worker; the crash alerts; the next run sends every row, none under two Message-IDs."""
    ids = enqueue(stack.app_db, 60)
    sink.handler.data_delay = 0.5  # 60 emails on 2 connections: about 15 s of sending
    deployment = stack.api(f"deployments/name/{JOB}/{JOB}")
    create = f"deployments/{deployment['id']}/create_flow_run"
    # A worker takes a cleanup-job run (Pending: the job's one slot is now its) and dies
    # before the run's process starts, so no heartbeat ever comes: the job is blocked.
    new_cleanup_run = new_run_of(stack, STARTLESS)
    never_started = stack.api(new_cleanup_run, {})["id"]
    assert propose(stack, never_started, "PENDING")["status"] == "ACCEPT"
    blocked = propose(stack, stack.api(new_cleanup_run, {})["id"], "PENDING")
    assert blocked["status"] != "ACCEPT", blocked  # the slot is held by the dead worker's run
    # A run of the expiry job went Running; its machine died (no heartbeat comes); an
    # operator cancels it from the UI (Cancelling), but no worker is left to finish that.
    new_expiry_run = new_run_of(stack, ABANDONED)
    abandoned = stack.api(new_expiry_run, {})["id"]
    for state_type in ("PENDING", "RUNNING", "CANCELLING"):
        assert propose(stack, abandoned, state_type)["status"] == "ACCEPT", state_type
    worker = start_worker(stack.project, worker_env, pool="backjobs", log=tmp_path / "w1.log")
    try:
        doomed = stack.api(create, {})["id"]
        wait_events(stack, name="prefect.flow-run.heartbeat",
                    resource=f"prefect.flow-run.{doomed}", timeout=120)  # fmt: skip
        wait_until("mid-send", lambda: len(sink.messages) >= 4, timeout=120)
        running = stack.api(f"flow_runs/{doomed}")
        kill_worker_and_run(worker, running)
        killed = time.monotonic()
        assert len(sink.messages) < len(ids), "the run finished before the kill"
        crashed = wait_state(stack, doomed, "CRASHED", timeout=240)
        took = time.monotonic() - killed
    finally:
        stop(worker)
    print(f"Crashed {took:.0f} s after the kill")  # shown with -s: the README quotes it
    assert took <= 180, f"Crashed {took:.0f} s after the kill"
    message = crashed["state"]["message"]
    assert "zombie detector" in message and "last heartbeat" in message, message
    worker_name = (running.get("labels") or {}).get("prefect.worker.name")
    assert worker_name and f"ran on worker {worker_name}" in message, (message, running)
    alert = stack.hook.wait_for(
        lambda b: any(a["flow_run_id"] == doomed for a in alerts_of(b, JOB)),
        timeout=60,
        what="the crash alert",
    )
    assert [a["state"] for a in alert if a["flow_run_id"] == doomed] == ["Crashed"]

    # The run its worker never started: Crashed as well (its window opened earlier), its
    # message saying so; it alerts, and the job's slot is free again.
    startless_crash = wait_state(stack, never_started, "CRASHED", timeout=60)["state"]
    text = startless_crash["message"]
    assert text.startswith("Crashed by the zombie detector: the run never started (Pending since ")
    assert f"a worker of pool '{IDLE_POOL}' took it and no process of it ran" in text, text
    stack.hook.wait_for(
        lambda b: any(a["flow_run_id"] == never_started for a in alerts_of(b, STARTLESS)),
        timeout=60,
        what="the alert of the run that never started",
    )
    # The run being cancelled: Cancelled, as asked, its slot free; no alert (not a failure).
    cancelled = wait_state(stack, abandoned, "CANCELLED", timeout=60)["state"]["message"]
    assert cancelled.startswith(
        "Cancelled by the zombie detector: no worker finished cancelling it, and heartbeats"
        " stopped (no heartbeat since it went Running at "
    ), cancelled
    for new_run in (new_cleanup_run, new_expiry_run):
        freed = stack.api(new_run, {})["id"]
        assert propose(stack, freed, "PENDING")["status"] == "ACCEPT", new_run
        cancel = {"state": {"type": "CANCELLED"}, "force": True}  # no worker will run it
        stack.api(f"flow_runs/{freed}/set_state", cancel)

    sink.handler.data_delay = 0.0
    worker = start_worker(stack.project, worker_env, pool="backjobs", log=tmp_path / "w2.log")
    try:
        after = stack.api(create, {})["id"]
        [done] = wait_final(stack, [after], timeout=180)
    finally:
        stop(worker)
    assert done["state_name"] == "Completed", done["state"]  # the slot was freed
    rows = outbox(stack.app_db)
    # Everything went out, the crash alert too; the recovery notice was queued when that
    # run completed, so it waits for the next one.
    waiting = {i: row for i, row in rows.items() if row[0] != "completed"}
    assert [row[0::2] for row in waiting.values()] == [("pending", "recovered")], rows
    assert sorted(row[2] for row in rows.values() if row[2] == "failed") == ["failed"] * 2
    stored = {message_id for status, message_id, _ in rows.values() if status == "completed"}
    received = [m.message_id for m in sink.messages]
    # Each row arrived under the Message-ID it was queued with and no other: a message cut
    # off by the kill may arrive twice, never under a second Message-ID.
    assert set(received) == stored, set(received) ^ stored
    assert alerts_of(stack.hook.received(), ABANDONED) == []  # cancelled, as asked: no failure


def new_run_of(stack: AlertStack, job: str) -> str:
    """The API path that creates a run of ``job``'s deployment."""
    deployment = stack.api(f"deployments/name/{job}/{job}")
    return f"deployments/{deployment['id']}/create_flow_run"


def propose(stack: AlertStack, run_id: str, state_type: str) -> Any:
    """What a worker (Pending: the job's slot is acquired here), the run's engine (Running)
    or the UI's Cancel button (Cancelling) proposes for a run."""
    return stack.api(f"flow_runs/{run_id}/set_state", {"state": {"type": state_type}})


def kill_worker_and_run(worker: Any, running: dict[str, Any]) -> None:
    """SIGKILL the worker, its process group and the run's process (a machine dying)."""
    os.killpg(worker.pid, signal.SIGKILL)
    pid = str(running.get("infrastructure_pid") or "").rpartition(":")[2]
    if pid.isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    worker.wait(timeout=10)


def wait_until(what: str, condition: Any, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)
