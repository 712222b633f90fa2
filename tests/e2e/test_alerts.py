"""Alerts end to end: ``backjobs dashboard`` (server, gate, alert receiver), ``backjobs
deploy`` of a small project, a process worker, the app database's outbox and a webhook
listener on loopback.

One dashboard for the module (BACKJOBS_ALERT_REPEAT_MINUTES=0.25, a silent floor of
0.25 min): ``quiet-job`` sits in a pool no worker polls from the start, so its silence is
checked last, when its window (one ``* * * * *`` period) has long passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from backjobs.db import make_engine, session_scope
from backjobs.models import AppTask, User
from tests.support.dashboard import GatedDashboard, gated_dashboard, migrated_sqlite
from tests.support.prefect_api import call_json
from tests.support.webhook import WebhookListener

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
POOL, IDLE_POOL = "alerts-test", "alerts-idle"
FLOW = """
from prefect import flow


@flow(name="flaky-job")
def flaky_job(fail: bool = True) -> str:
    if fail:
        raise RuntimeError("flaky-job failed on purpose")
    return "ok"


@flow(name="sleepy-job")
def sleepy_job(seconds: float = 600) -> str:
    import time

    time.sleep(seconds)
    return "ok"


@flow(name="quiet-job")
def quiet_job() -> str:
    return "ok"
"""


def project_file(folder: Path) -> None:
    deployments = [
        {
            "name": "flaky-job",
            "description": "Triggered only (no schedule); fails when told to.",
            "entrypoint": "flows/alerting.py:flaky_job",
            "work_pool": {"name": POOL},
        },
        {
            "name": "sleepy-job",
            "description": "Triggered only (no schedule); sleeps.",
            "entrypoint": "flows/alerting.py:sleepy_job",
            "work_pool": {"name": POOL},
            "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
        },
        {
            "name": "quiet-job",
            "description": "Every minute — `* * * * *`. Never runs: no worker polls its pool.",
            "entrypoint": "flows/alerting.py:quiet_job",
            "work_pool": {"name": IDLE_POOL},
            "schedules": [{"cron": "* * * * *", "timezone": "UTC", "slug": "quiet"}],
        },
    ]
    document = {
        "name": "alerts-test",
        "prefect-version": "3.9.1",
        "pull": [{"backjobs.orchestration.deploy.set_project_directory": {}}],
        "deployments": deployments,
    }
    (folder / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    (folder / "flows").mkdir()
    (folder / "flows" / "alerting.py").write_text(textwrap.dedent(FLOW))


@dataclass
class Stack:
    dash: GatedDashboard
    hook: WebhookListener
    app_db: str
    project: Path

    def api(self, path: str, body: Any = None) -> Any:
        method = "GET" if body is None else "POST"
        return call_json(
            method, f"{self.dash.api}/{path}", headers=self.dash.machine_headers(), body=body
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("alerts")
    app_db = migrated_sqlite(folder)
    engine = make_engine(app_db)
    with session_scope(engine) as session:
        session.add_all(
            [
                User(email="ops@example.com", is_admin=True, registration_status="approved"),
                User(email="new@example.com", is_admin=True, registration_status="pending"),
            ]
        )
    engine.dispose()
    project = folder / "project"
    project.mkdir()
    project_file(project)
    with WebhookListener() as hook:
        extra = {
            "BACKJOBS_ALERT_WEBHOOK_URL": hook.url,
            "BACKJOBS_ALERT_REPEAT_MINUTES": "0.25",
            "BACKJOBS_DASHBOARD_PUBLIC_URL": "https://jobs.example",
        }
        with gated_dashboard(folder / "dash", app_db_url=app_db, extra_env=extra) as dash:
            yield Stack(dash, hook, app_db, project)


def run(command: list[str], *, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    env = stack.dash.prefect_env | {
        "BACKJOBS_ALERT_SILENT_AFTER_PERIODS": "1",
        "BACKJOBS_ALERT_SILENT_MIN_MINUTES": "0.25",
    }
    for pool in (POOL, IDLE_POOL):
        run([str(bin_dir / "prefect"), "work-pool", "create", "--type", "process", pool],
            env=env, cwd=stack.project)  # fmt: skip
    out = run([str(bin_dir / "backjobs"), "deploy"], env=env, cwd=stack.project)
    assert len(re.findall(r"^[a-z-]+: automation backjobs-[a-z-]+ created$", out, re.M)) == 7, out
    return env


def alerts_of(bodies: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    return [b for b in bodies if b["job"] == job]


def start_worker(stack: Stack, env: dict[str, str]) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL],
        cwd=stack.project,
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return worker


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def test_a_run_whose_worker_and_process_die_is_crashed_within_3_minutes_and_frees_its_slot(
    stack: Stack, deployed: dict[str, str]
) -> None:
    deployment = stack.api("deployments/name/sleepy-job/sleepy-job")
    create = f"deployments/{deployment['id']}/create_flow_run"
    worker = start_worker(stack, deployed)
    try:
        doomed = stack.api(create, {"parameters": {"seconds": 600}})["id"]
        running = wait_state(stack, doomed, "RUNNING", timeout=120)
        wait_heartbeat(stack, doomed, timeout=60)
        host_pid = str(running.get("infrastructure_pid") or "")
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and what shares its group
        if host_pid.rpartition(":")[2].isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(host_pid.rpartition(":")[2]), signal.SIGKILL)
        worker.wait(timeout=10)
        killed = time.monotonic()
        crashed = wait_state(stack, doomed, "CRASHED", timeout=240)
        took = time.monotonic() - killed
        assert took <= 180, f"Crashed {took:.0f} s after the kill"
        message = crashed["state"]["message"]
        assert "zombie detector" in message and "last heartbeat" in message, message
        assert "ran on worker" in message, message
        alert = stack.hook.wait_for(
            lambda b: any(a["flow_run_id"] == doomed for a in b), timeout=60, what="crash alert"
        )
        assert [a["state"] for a in alert if a["flow_run_id"] == doomed] == ["Crashed"]
        worker = start_worker(stack, deployed)
        next_run = stack.api(create, {"parameters": {"seconds": 1}})["id"]
        [after] = wait_final(stack, [next_run], timeout=120)
        assert after["state_name"] == "Completed", after["state"]  # the slot was freed
    finally:
        stop(worker)


def test_ten_failures_are_all_counted_grouped_and_recovery_is_one_notice(
    stack: Stack, deployed: dict[str, str]
) -> None:
    deployment = stack.api("deployments/name/flaky-job/flaky-job")
    ids = [
        stack.api(
            f"deployments/{deployment['id']}/create_flow_run", {"parameters": {"fail": True}}
        )["id"]
        for _ in range(10)
    ]
    worker = start_worker(stack, deployed)
    try:
        runs = wait_final(stack, ids, timeout=240)
        assert sorted(r["state_name"] for r in runs) == ["Failed"] * 10
        ends = sorted(r["end_time"] for r in runs)
        # Every failure is counted by some alert: the first at once, the rest grouped.
        bodies = stack.hook.wait_for(
            lambda b: sum(a["new_failures"] for a in alerts_of(b, "flaky-job")) >= 10,
            timeout=120,
            what="alerts counting 10 failures",
        )
        flaky = alerts_of(bodies, "flaky-job")
        assert sum(a["new_failures"] for a in flaky) == 10, flaky
        assert flaky[0]["kind"] == "failed" and flaky[0]["failures"] == 1
        assert all(a["kind"] == "still failing" for a in flaky[1:]), flaky
        assert len(flaky) < 10, f"not grouped: {len(flaky)} alerts for 10 failures ({ends})"
        assert flaky[-1]["failures"] == 10
        first = flaky[0]
        assert first["state"] == "Failed" and first["flow_run_id"] in ids
        assert "failed on purpose" in first["message"]
        assert first["url"] == f"https://jobs.example/runs/flow-run/{first['flow_run_id']}"

        ok = stack.api(
            f"deployments/{deployment['id']}/create_flow_run", {"parameters": {"fail": False}}
        )
        wait_final(stack, [ok["id"]], timeout=120)
        bodies = stack.hook.wait_for(
            lambda b: any(a["kind"] == "recovered" for a in b), timeout=60, what="recovered"
        )
    finally:
        stop(worker)
    recovered = [a for a in alerts_of(bodies, "flaky-job") if a["kind"] == "recovered"]
    assert len(recovered) == 1 and recovered[0]["flow_run_id"] == ok["id"]
    emails = [e for e in alert_emails(stack.app_db) if e["context"]["job"] == "flaky-job"]
    assert len(emails) == len(alerts_of(stack.hook.received(), "flaky-job"))
    assert all(e["to"] == ["ops@example.com"] for e in emails), emails  # approved admins only


def test_a_job_gone_silent_alerts_once(stack: Stack, deployed: dict[str, str]) -> None:
    bodies = stack.hook.wait_for(
        lambda b: any(a["kind"] == "silent" for a in alerts_of(b, "quiet-job")),
        timeout=150,
        what="quiet-job silent",
    )
    silent = alerts_of(bodies, "quiet-job")
    assert [a["kind"] for a in silent] == ["silent"]
    assert silent[0]["url"].startswith("https://jobs.example/deployments/deployment/")
    assert any(e["context"]["kind"] == "silent" for e in alert_emails(stack.app_db))


def alert_emails(app_db: str) -> list[dict[str, Any]]:
    engine = make_engine(app_db)
    try:
        with session_scope(engine) as session:
            payloads = session.scalars(select(AppTask.payload).order_by(AppTask.id)).all()
    finally:
        engine.dispose()
    found = [p if isinstance(p, dict) else json.loads(p) for p in payloads]
    return [p for p in found if p.get("template") == "job-alert"]


def wait_final(stack: Stack, ids: list[str], *, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = stack.api("flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        if len(runs) == len(ids) and all(
            r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs
        ):
            return list(runs)
        if time.monotonic() > deadline:
            pytest.fail(f"runs not final in {timeout} s: {[r['state_name'] for r in runs]}")
        time.sleep(1)


def wait_state(stack: Stack, run_id: str, state_type: str, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run = stack.api(f"flow_runs/{run_id}")
        if run["state_type"] == state_type:
            return dict(run)
        if time.monotonic() > deadline:
            pytest.fail(f"run not {state_type} in {timeout} s: {run['state_name']}")
        time.sleep(1)


def wait_heartbeat(stack: Stack, run_id: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        },
        "limit": 1,
    }
    while not stack.api("events/filter", query)["events"]:
        if time.monotonic() > deadline:
            pytest.fail(f"no heartbeat from run {run_id} in {timeout} s")
        time.sleep(1)
