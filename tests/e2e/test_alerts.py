"""Alerts end to end: ``backjobs dashboard`` (server, gate, alert receiver), ``backjobs
deploy`` of a small project, process workers, the app database's outbox and a webhook
listener on loopback (issue 17, items 1-3; durable incidents).

One dashboard for the module (BACKJOBS_ALERT_REPEAT_MINUTES=0.25; the server's scheduler
looking every 2 s). Silence has a module of its own (test_alerts_silence.py), so its
minutes of waiting run beside these tests, in another test process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from backjobs.orchestration.alert_receiver import REDELIVERY_SETTLE
from backjobs.orchestration.alert_redelivery import WATERMARK
from backjobs.orchestration.automations import ensure_receiver_block, receiver_url
from tests.support.alerts import (
    AlertStack,
    alert_emails,
    alert_stack,
    alerts_of,
    create_pools,
    deploy,
    start_worker,
    stop,
    wait_final,
)
from tests.support.dashboard import AUTH_STRING, restart_dashboard
from tests.support.prefect_api import call_json

pytestmark = pytest.mark.slow

POOL = "alerts-test"
FLAKY = "flaky-job"
FLOW = """
from prefect import flow


@flow(name="flaky-job")
def flaky_job(fail: bool = True) -> str:
    if fail:
        raise RuntimeError("flaky-job failed on purpose")
    return "ok"
"""
DEPLOYMENTS = [
    {
        "name": FLAKY,
        "description": "Triggered only (no schedule); fails unless told not to.",
        "entrypoint": "flows/alerting.py:flaky_job",
        "work_pool": {"name": POOL},
    },
]


@dataclass
class Deployed:
    env: dict[str, str]
    worker: Any  # the flaky-job worker (replaced when restarted)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertStack]:
    env = {
        "BACKJOBS_ALERT_REPEAT_MINUTES": "0.25",
        "BACKJOBS_DASHBOARD_PUBLIC_URL": "https://jobs.example",
        # The scheduler inserts the test's runs within seconds (Prefect: every 60 s),
        # all ten of them (the dashboard's default keeps 3 per schedule).
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "12",
    }
    folder = tmp_path_factory.mktemp("alerts")
    with alert_stack(folder, flows=FLOW, deployments=DEPLOYMENTS, env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def deployed(stack: AlertStack) -> Iterator[Deployed]:
    env = stack.dash.prefect_env
    create_pools(stack, POOL)
    out = deploy(stack, env)
    assert out.count(": automation backjobs-") == 2, out  # alert, zombie (no schedule)
    state = Deployed(env, None)
    state.worker = start_worker(stack.project, env, pool=POOL)
    try:
        yield state
    finally:
        stop(state.worker)


def test_an_open_incident_survives_a_dashboard_restart(
    stack: AlertStack, deployed: Deployed
) -> None:
    """Failure, restart, failure, recovery: the incident goes on (no new ``failed``), and
    the ``recovered`` notice counts every failure."""
    deployment = stack.api(f"deployments/name/{FLAKY}/{FLAKY}")
    create = f"deployments/{deployment['id']}/create_flow_run"
    before = len(stack.hook.received())
    failed = 1  # the incident opens with this test's first failure
    failing = stack.api(create, {"parameters": {"fail": True}})["id"]
    wait_final(stack, [failing], timeout=120)
    wait_incident(stack, FLAKY, failures=failed, timeout=60)
    stop(deployed.worker)
    restart_dashboard(stack.dash)
    deployed.worker = start_worker(stack.project, deployed.env, pool=POOL)
    again = stack.api(create, {"parameters": {"fail": True}})["id"]
    wait_final(stack, [again], timeout=120)
    wait_incident(stack, FLAKY, failures=failed + 1, timeout=60)
    ok = stack.api(create, {"parameters": {"fail": False}})["id"]
    [done] = wait_final(stack, [ok], timeout=120)
    assert done["state_name"] == "Completed"
    bodies = stack.hook.wait_for(
        lambda b: any(a["kind"] == "recovered" for a in alerts_of(b, FLAKY)),
        timeout=60,
        what="recovered",
    )
    seen = alerts_of(bodies[before:], FLAKY)
    assert [a["kind"] for a in seen].count("failed") == 1, seen  # one incident
    assert seen[0]["kind"] == "failed" and seen[0]["flow_run_id"] == failing
    [recovered] = [a for a in seen if a["kind"] == "recovered"]
    assert recovered["flow_run_id"] == ok
    assert recovered["failures"] == failed + 1
    assert sum(a["new_failures"] for a in seen) == failed + 1
    wait_incident(stack, FLAKY, failures=None, timeout=60)  # closed


def incident(stack: AlertStack, job: str) -> dict[str, Any] | None:
    found = stack.api(
        "variables/filter", {"variables": {"name": {"any_": [f"backjobs-incident-{job}"]}}}
    )
    return dict(found[0]["value"]) if found else None


def wait_incident(
    stack: AlertStack,
    job: str,
    *,
    failures: int | None,
    timeout: float,
    reported: int | None = None,
) -> None:
    """Until the server holds the job's incident with this many failures (None: none), and
    this many reported, if ``reported`` is given."""
    deadline = time.monotonic() + timeout
    while True:
        found = incident(stack, job)
        if (found and found["failures"]) == failures and (
            reported is None or (found and found["reported"]) == reported
        ):
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"incident of {job} not at {failures} failures ({reported} reported) "
                f"in {timeout} s: {found}"
            )
        time.sleep(0.5)


def test_ten_scheduled_failures_two_a_second_apart_are_all_alerted_and_grouped(
    stack: AlertStack, deployed: Deployed
) -> None:
    """The runs come from the server's scheduler (no Scheduled event) and go Pending within
    seconds of being created: Prefect's causal ordering parked their state events for 15
    minutes (4 of 10 failures alerted); backjobs' ordering lets all through at once."""
    deployment = stack.api(f"deployments/name/{FLAKY}/{FLAKY}")
    before, emailed = len(stack.hook.received()), len(alert_emails(stack.app_db))
    logged = len(stack.dash.log())
    first = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
    offsets = (0, 4, 8, 12, 13, 17, 21, 25, 29, 33)  # 12 and 13: a second apart
    times = [first + timedelta(seconds=s) for s in offsets]
    rrule = f"DTSTART:{first:%Y%m%dT%H%M%SZ}\nRDATE:" + ",".join(
        f"{t:%Y%m%dT%H%M%SZ}" for t in times
    )
    schedule = {"schedule": {"rrule": rrule, "timezone": "UTC"}, "active": True}
    stack.api(f"deployments/{deployment['id']}/schedules", [schedule])
    ids = wait_scheduled(stack, deployment["id"], count=10, timeout=25)
    runs = wait_final(stack, ids, timeout=240)
    assert sorted(r["state_name"] for r in runs) == ["Failed"] * 10
    assert sorted(datetime.fromisoformat(r["expected_start_time"]) for r in runs) == times
    # Every failure is counted by some alert: the first at once, the rest grouped.
    bodies = stack.hook.wait_for(
        lambda b: sum(a["new_failures"] for a in alerts_of(b[before:], FLAKY)) >= 10,
        timeout=90,
        what="alerts counting 10 failures",
    )
    flaky = alerts_of(bodies[before:], FLAKY)
    assert sum(a["new_failures"] for a in flaky) == 10, flaky
    assert flaky[0]["kind"] == "failed" and flaky[0]["failures"] == 1
    assert all(a["kind"] == "still failing" for a in flaky[1:]), flaky
    assert 1 < len(flaky) < 10, f"not grouped: {len(flaky)} alerts for 10 failures"
    assert flaky[-1]["failures"] == 10
    alerted = flaky[0]
    assert alerted["state"] == "Failed" and alerted["flow_run_id"] in ids
    assert "failed on purpose" in alerted["message"]
    assert alerted["url"] == f"https://jobs.example/runs/flow-run/{alerted['flow_run_id']}"
    emails = [e for e in alert_emails(stack.app_db)[emailed:] if e["context"]["job"] == FLAKY]
    assert [e["context"]["kind"] for e in emails] == [a["kind"] for a in flaky]
    assert all(e["to"] == ["ops@example.com"] for e in emails), emails  # approved admins only
    # The receiver sends an alert before it stores the incident (none is counted unsent):
    # the server's incident holds all ten, every one reported, once the last store is done
    # (the one after the last alert: the hook may have it before the store).
    wait_incident(stack, FLAKY, failures=10, reported=10, timeout=60)
    # No call of the server's to the receiver was cut off by another's (webhook_calls).
    this_test = stack.dash.log()[logged:].splitlines()
    cut = [line for line in this_test if "Webhook call failed" in line]
    assert cut == [], cut


def wait_scheduled(
    stack: AlertStack, deployment_id: str, *, count: int, timeout: float
) -> list[str]:
    """The ids of the deployment's runs the scheduler created, once there are ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        found = stack.api("flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
        runs = [r for r in found if r["auto_scheduled"]]
        if len(runs) >= count:
            return [r["id"] for r in runs]
        if time.monotonic() > deadline:
            pytest.fail(f"the scheduler created {len(runs)} of {count} runs in {timeout} s")
        time.sleep(0.5)


def test_a_run_attempt_that_fails_twice_is_one_failure(
    stack: AlertStack, deployed: Deployed
) -> None:
    """Prefect allows Failed → Failed and Crashed → Failed (a client retrying its state change
    after a lost answer; a run the zombie check crashed reporting its own end): the second
    failure event of one attempt is a duplicate, counted by no alert."""
    deployment = stack.api(f"deployments/name/{FLAKY}/{FLAKY}")
    known = incident(stack, FLAKY)
    failures = known["failures"] if known else 0
    failing = stack.api(
        f"deployments/{deployment['id']}/create_flow_run", {"parameters": {"fail": True}}
    )["id"]
    wait_final(stack, [failing], timeout=120)
    wait_incident(stack, FLAKY, failures=failures + 1, timeout=60)
    for event in ("prefect.flow-run.Failed", "prefect.flow-run.Crashed"):
        call = {
            "signal": "state",
            "job": FLAKY,
            "deployment_id": deployment["id"],
            "flow_run_id": failing,
            "event_id": str(uuid.uuid4()),  # a new event of the same attempt
            "event": event,
        }
        answer = call_json(
            "POST", f"{stack.dash.url}/backjobs/alerts", headers=stack.dash.machine_headers(),
            body=call,
        )  # fmt: skip
        assert answer == {"outcome": "duplicate"}, (event, answer)
    assert (incident(stack, FLAKY) or {}).get("failures") == failures + 1


def test_a_call_the_receiver_refused_is_delivered_again_from_the_event_log(
    stack: AlertStack, deployed: Deployed
) -> None:
    """The webhook block holds a credential the dashboard no longer takes (the machine
    credential changed without a deploy): Prefect's call is answered 401, which it records
    as done. The receiver finds the call in the server's event log and handles it: the
    failure is counted, once, and alerted."""
    deployment = stack.api(f"deployments/name/{FLAKY}/{FLAKY}")
    known = incident(stack, FLAKY)
    failures = known["failures"] if known else 0
    before = len(stack.hook.received())
    set_receiver_credential(stack, "worker:a-credential-the-dashboard-does-not-take")
    try:
        failing = stack.api(
            f"deployments/{deployment['id']}/create_flow_run", {"parameters": {"fail": True}}
        )["id"]
        wait_final(stack, [failing], timeout=120)
        refused = wait_log(stack, "alert call refused: not the machine credential", timeout=60)
    finally:
        set_receiver_credential(stack, AUTH_STRING)
    # The refused call's event is read once it is REDELIVERY_SETTLE old, at a flusher pass.
    wait_incident(stack, FLAKY, failures=failures + 1, timeout=120)
    redelivered = wait_log(stack, f"alert redelivered: state call for job {FLAKY}, run "
                                  f"{failing} (it answered 401)", timeout=30)  # fmt: skip
    assert refused and redelivered
    # Alerted: an alert (a first failure or "still failing") counts it in the incident.
    bodies = stack.hook.wait_for(
        lambda b: any(a["failures"] == failures + 1 for a in alerts_of(b[before:], FLAKY)),
        timeout=60,
        what="an alert counting the redelivered failure",
    )
    assert max(a["failures"] for a in alerts_of(bodies[before:], FLAKY)) == failures + 1
    # A later pass read past the call and did not handle it again.
    wait_redelivery_read_past(stack, datetime.now(UTC) - REDELIVERY_SETTLE, timeout=60)
    assert (incident(stack, FLAKY) or {}).get("failures") == failures + 1
    line = f"alert redelivered: state call for job {FLAKY}, run {failing} "
    assert stack.dash.log().count(line) == 1


def set_receiver_credential(stack: AlertStack, auth_string: str) -> None:
    """Store ``auth_string`` in the automations' webhook block, as a deploy would."""

    async def store() -> None:
        async with get_client() as client:
            url = receiver_url(stack.dash.prefect_env["PREFECT_API_URL"])
            await ensure_receiver_block(client, url=url, auth_string=auth_string)

    updates = {
        PREFECT_API_URL: stack.dash.prefect_env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: AUTH_STRING,
    }
    with temporary_settings(updates=updates):
        asyncio.run(store())


def wait_redelivery_read_past(stack: AlertStack, moment: datetime, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = stack.api("variables/filter", {"variables": {"name": {"any_": [WATERMARK]}}})
        if found and datetime.fromisoformat(found[0]["value"]["until"]) > moment:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the redelivery did not read past {moment} in {timeout} s: {found}")
        time.sleep(0.5)


def wait_log(stack: AlertStack, text: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in stack.dash.log().splitlines() if text in line]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not in the dashboard's log in {timeout} s")
        time.sleep(0.5)
