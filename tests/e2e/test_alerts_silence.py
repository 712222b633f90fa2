"""Silence is a failure too (issue 17, item 3): a scheduled job whose worker stopped
alerts ``silent`` once, by email and webhook, through ``backjobs dashboard``'s alert
receiver and the silent automation ``backjobs deploy`` keeps.

``quiet-job`` (``* * * * *``, silent after one period: the 10-minute floor lowered for this
test rig with BACKJOBS_ALERT_ALLOW_SHORT_SILENCE) is deployed with its schedule paused, runs
once by hand on a worker of its own queue, which then stops; then its schedule is made
active (deployed again, which adds the silent automation), and its scheduled runs wait in a
queue no worker polls. Deployed in that order, the silent window opens after the last
completed run, so the alert comes one window (a minute) later: a run completing inside the
automation's first window would put it off by one or two more. A module of its own, so its
waiting runs beside the other alert tests, in another test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.support.alerts import (
    AlertStack,
    alert_emails,
    alert_stack,
    alerts_of,
    create_pools,
    deploy,
    start_worker,
    stop,
    wait_events,
    wait_final,
    write_project,
)
from tests.support.prefect_api import call

pytestmark = pytest.mark.slow

QUIET_POOL = "alerts-quiet"
QUIET = "quiet-job"
FLOW = """
from prefect import flow


@flow(name="quiet-job")
def quiet_job() -> str:
    return "ok"
"""


def deployments(*, active: bool) -> list[dict[str, Any]]:
    schedule = {"cron": "* * * * *", "timezone": "UTC", "slug": "quiet", "active": active}
    return [
        {
            "name": QUIET,
            "description": "Every minute — `* * * * *`"
            + ("" if active else " (paused)")
            + ". Its scheduled runs wait in a queue no worker polls.",
            "entrypoint": "flows/alerting.py:quiet_job",
            "work_pool": {"name": QUIET_POOL},
            "schedules": [schedule],
        },
    ]


@dataclass
class Deployed:
    env: dict[str, str]
    quiet_stopped_at: datetime  # when quiet-job's only worker stopped, after its run


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    env = {"BACKJOBS_DASHBOARD_PUBLIC_URL": "https://jobs.example"}
    folder = tmp_path_factory.mktemp("alerts-silence")
    with alert_stack(folder, flows=FLOW, deployments=deployments(active=False), env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def deployed(stack: AlertStack) -> Deployed:
    env = stack.dash.prefect_env | {
        "BACKJOBS_ALERT_SILENT_AFTER_PERIODS": "1",
        "BACKJOBS_ALERT_SILENT_MIN_MINUTES": "0.25",
        "BACKJOBS_ALERT_ALLOW_SHORT_SILENCE": "true",
    }
    create_pools(stack, QUIET_POOL)
    out = deploy(stack, env)
    assert out.count(": automation backjobs-") == 2, out  # alert, zombie: no active schedule
    # quiet-job runs once, by hand, on a worker of its own queue; then that worker stops.
    quiet = stack.api(f"deployments/name/{QUIET}/{QUIET}")
    quiet_worker = start_worker(stack.project, env, pool=QUIET_POOL, queue="manual")
    try:
        ran = stack.api(f"deployments/{quiet['id']}/create_flow_run", {"work_queue_name": "manual"})
        [done] = wait_final(stack, [ran["id"]], timeout=180)
        assert done["state_name"] == "Completed", done["state"]
    finally:
        stop(quiet_worker)
    stopped = datetime.now(UTC)
    write_project(stack.project, deployments(active=True))
    out = deploy(stack, env)
    assert f"automation backjobs-{QUIET}-silent created" in out, out
    return Deployed(env, quiet_stopped_at=stopped)


def test_a_job_whose_worker_stopped_alerts_silent_exactly_once(
    stack: AlertStack, deployed: Deployed
) -> None:
    """quiet-job ran and completed, then its worker stopped: the server's silent automation
    fires and one ``silent`` alert goes out (webhook and email); when the automation calls
    again (its next window: the very same call, made here at once rather than waited for),
    nothing more goes out."""
    stopped = deployed.quiet_stopped_at
    deployment = stack.api(f"deployments/name/{QUIET}/{QUIET}")

    def silent_alerts(bodies: list[Any]) -> list[dict[str, Any]]:
        return [
            a
            for a in alerts_of(bodies, QUIET)
            if a["kind"] == "silent" and datetime.fromisoformat(a["at"]) >= stopped
        ]

    stack.hook.wait_for(lambda b: bool(silent_alerts(b)), timeout=240, what="a silent alert")
    [automation] = [
        a for a in stack.api("automations/filter", {}) if a["name"] == f"backjobs-{QUIET}-silent"
    ]
    wait_events(
        stack,
        name="prefect.automation.action.executed",
        resource=f"prefect.automation.{automation['id']}",
        count=1,
        since=stopped,
        timeout=30,
    )
    # The automation's own call, again: what its next window would send.
    again = {"signal": "silent", "job": QUIET, "deployment_id": deployment["id"]}
    receiver = f"{stack.dash.url}/backjobs/alerts"
    answer = call("POST", receiver, headers=stack.dash.machine_headers(), body=again)
    assert answer.status_code == 200, answer.text
    # The webhook is posted in the background: give a wrong second one time to arrive.
    with pytest.raises(AssertionError, match="a second silent alert not seen"):
        stack.hook.wait_for(
            lambda b: len(silent_alerts(b)) > 1, timeout=5, what="a second silent alert"
        )
    silent = silent_alerts(stack.hook.received())
    assert [a["kind"] for a in silent] == ["silent"], silent
    assert silent[0]["url"].startswith("https://jobs.example/deployments/deployment/")
    emails = [
        e
        for e in alert_emails(stack.app_db)
        if e["context"]["job"] == QUIET and datetime.fromisoformat(e["context"]["at"]) >= stopped
    ]
    assert [e["context"]["kind"] for e in emails] == ["silent"]
