"""What the alert tests share: a gated dashboard with a webhook listener, a project folder
deployed with ``backjobs deploy``, process workers, and waiting on runs and events.

    stack = AlertStack(dash, hook, app_db, project)
    stack.api("deployments/name/flaky-job/flaky-job")
    worker = start_worker(stack.project, env, pool="alerts-test")
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from backjobs.db import make_engine, session_scope
from backjobs.models import AppTask, User
from backjobs.orchestration.alert_delivery import retrying
from backjobs.stack.pool import locked_process_template
from tests.support.dashboard import GatedDashboard, gated_dashboard, migrated_sqlite
from tests.support.prefect_api import call_json, create_process_pool
from tests.support.prefect_server import stop_workers
from tests.support.webhook import WebhookListener

BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass
class AlertStack:
    dash: GatedDashboard
    hook: WebhookListener
    app_db: str
    project: Path

    def api(self, path: str, body: Any = None, *, method: str | None = None) -> Any:
        verb = method or ("GET" if body is None else "POST")
        return call_json(
            verb, f"{self.dash.api}/{path}", headers=self.dash.machine_headers(), body=body
        )


@contextmanager
def alert_stack(
    folder: Path, *, flows: str, deployments: list[dict[str, Any]], env: dict[str, str]
) -> Iterator[AlertStack]:
    """``backjobs dashboard`` on an app database with admins, a project of ``deployments``
    whose ``flows/alerting.py`` is ``flows``, and a webhook listener that receives the
    alerts (``env`` adds to the dashboard's environment)."""
    app_db = migrated_sqlite(folder)
    add_admins(app_db)
    project = folder / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "alerting.py").write_text(textwrap.dedent(flows))
    write_project(project, deployments)
    with WebhookListener() as hook:
        extra = {"BACKJOBS_ALERT_WEBHOOK_URL": hook.url} | env
        with gated_dashboard(folder / "dash", app_db_url=app_db, extra_env=extra) as dash:
            yield AlertStack(dash, hook, app_db, project)


def add_admins(app_db: str) -> None:
    """One approved admin (ops@example.com), one pending (must get no alert)."""
    engine = make_engine(app_db)
    with session_scope(engine) as session:
        session.add_all(
            [
                User(email="ops@example.com", is_admin=True, registration_status="approved"),
                User(email="new@example.com", is_admin=True, registration_status="pending"),
            ]
        )
    engine.dispose()


def write_project(folder: Path, deployments: list[dict[str, Any]]) -> None:
    document = {
        "name": "alerts-test",
        "prefect-version": "3.9.1",
        "pull": [{"backjobs.orchestration.deploy.set_project_directory": {}}],
        "deployments": deployments,
    }
    (folder / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


def run(command: list[str], *, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def deploy(stack: AlertStack, env: dict[str, str]) -> str:
    """``backjobs deploy`` of the stack's project; its output."""
    return run([str(BIN / "backjobs"), "deploy"], env=env, cwd=stack.project)


def create_pools(stack: AlertStack, *pools: str) -> None:
    """Process work pools with the backjobs pool's job template (as the README has ops
    create theirs: it gives runs their heartbeat), created through the gate with the
    machine token."""
    template = locked_process_template()
    for pool in pools:
        create_process_pool(
            stack.dash.api, pool, headers=stack.dash.machine_headers(), template=template
        )


def start_worker(
    project: Path,
    env: dict[str, str],
    *,
    pool: str,
    queue: str | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """A process worker polling every 2 s that takes a run only when it is due.

    The gate's Prefect database is SQLite, which answers a write that meets another 503
    (SQLITE_BUSY_SNAPSHOT), and Prefect's client retries a 503 five times (2 + 4 + … + 32 s).
    On a CPU-starved machine ten runs starting at once kept that up for two and a half
    minutes: the worker gave up on one run's labels and Prefect marked the run Crashed. So
    the worker retries eight times (up to ≈ 8 min of waiting).
    """
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool]
    if queue:
        command += ["--work-queue", queue]
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        command,
        cwd=project,
        env=env
        | {
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            "PREFECT_CLIENT_MAX_RETRIES": "8",
        },
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(worker: subprocess.Popen[bytes]) -> None:
    stop_workers([worker])


def alerts_of(bodies: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    return [b for b in bodies if b["job"] == job]


def alert_emails(app_db: str) -> list[dict[str, Any]]:
    """The payloads of the outbox's ``job-alert`` emails, in queue order."""
    engine = make_engine(app_db)
    try:
        with session_scope(engine) as session:
            payloads = session.scalars(select(AppTask.payload).order_by(AppTask.id)).all()
    finally:
        engine.dispose()
    found = [p if isinstance(p, dict) else json.loads(p) for p in payloads]
    return [p for p in found if p.get("template") == "job-alert"]


def wait_final(stack: AlertStack, ids: list[str], *, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = stack.api("flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        if len(runs) == len(ids) and all(r["state_type"] in FINAL for r in runs):
            return list(runs)
        if time.monotonic() > deadline:
            pytest.fail(f"runs not final in {timeout} s: {[r['state_name'] for r in runs]}")
        time.sleep(1)


def wait_state(
    stack: AlertStack, run_id: str, state_type: str, *, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = stack.api(f"flow_runs/{run_id}")
        if found["state_type"] == state_type:
            return dict(found)
        if time.monotonic() > deadline:
            pytest.fail(f"run not {state_type} in {timeout} s: {found['state_name']}")
        time.sleep(1)


def events(
    stack: AlertStack, *, name: str, resource: str, since: datetime | None = None
) -> list[dict[str, Any]]:
    query: dict[str, Any] = {
        "filter": {"event": {"name": [name]}, "resource": {"id": [resource]}},
        "limit": 50,
    }
    if since is not None:
        query["filter"]["occurred"] = {"since": since.isoformat()}
    return list(stack.api("events/filter", query)["events"])


def wait_events(
    stack: AlertStack,
    *,
    name: str,
    resource: str,
    count: int = 1,
    since: datetime | None = None,
    timeout: float,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = events(stack, name=name, resource=resource, since=since)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{count} x {name} of {resource} not seen in {timeout} s: {len(found)}")
        time.sleep(1)


def event(name: str, resource: dict[str, str], at: datetime, **more: Any) -> dict[str, Any]:
    """An event as ``POST /api/events`` takes it (a new id)."""
    return {"id": str(uuid.uuid4()), "event": name, "occurred": at.isoformat(),
            "resource": resource, **more}  # fmt: skip


def call_event(
    automation: dict[str, Any], trigger: dict[str, Any], at: datetime, **payload: Any
) -> dict[str, Any]:
    """The event Prefect's actions service writes for a webhook call of ``automation``
    that ``trigger`` fired: ``action.failed`` given a ``reason``, else ``action.executed``
    (with the answer's ``status_code``)."""
    name = "failed" if "reason" in payload else "executed"
    return event(
        f"prefect.automation.action.{name}",
        {"prefect.resource.id": f"prefect.automation.{automation['id']}",
         "prefect.resource.name": automation["name"]},
        at,
        related=[{"prefect.resource.id": f"prefect.event.{trigger['id']}",
                  "prefect.resource.role": "triggering-event"}],
        payload={"action_index": 0, "action_type": "call-webhook", **payload},
    )  # fmt: skip


async def post_retried(api: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    """POST to the test run's shared Prefect server, which answers 503 while its SQLite file
    is locked by the other test processes' writes: retried, as the receiver's writes are."""

    async def post() -> httpx.Response:
        return (await api.post(path, json=body)).raise_for_status()

    return await retrying(f"POST {path}", post)
