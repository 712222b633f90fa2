"""A run of a schedule that is gone, paused or whose cron was changed ends Cancelled without
doing its job; one of an active schedule runs (the job base against the test run's Prefect
server).

The orphan is made as Prefect leaves one behind: a run queued for a concurrency slot
(``AwaitingConcurrencySlot``) survives its schedule's deletion, pause or cron edit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.schedules import CronSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.flow_engine import run_flow
from prefect.states import Scheduled

from backjobs.orchestration.jobbase import job_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")

RAN: list[datetime] = []


@dataclass(frozen=True)
class Done:
    as_of: datetime


@job_flow("OrphanProbeJob")
def orphan_probe_job(as_of: datetime) -> Done:
    RAN.append(as_of)
    return Done(as_of)


def deploy_probe(client: Any, name: str) -> Any:
    """Create (or, as ``prefect deploy`` does, upsert) a deployment of the probe with one
    active cron schedule, no slug; its id."""
    return client.create_deployment(
        flow_id=client.create_flow_from_name(orphan_probe_job.name),
        name=name,
        schedules=[
            DeploymentScheduleCreate(schedule=CronSchedule(cron="*/5 * * * *"), active=True)
        ],
    )


def scheduled_run(
    client: Any, name: str | None = None, *, since: datetime | None = None
) -> tuple[Any, Any]:
    """A deployment of the probe with one active cron schedule, and one of the runs the
    server's scheduler code made of it (auto-scheduled, created by the schedule); with
    ``since``, the first due at or after that time (a backfill, when it is past)."""
    deployment_id = deploy_probe(client, name or f"orphans-{uuid.uuid4().hex[:8]}")
    window: dict[str, Any] = {"min_runs": 1, "max_runs": 1}
    if since is not None:
        window["start_time"] = since.isoformat()
    response = client.request(
        "POST", "/deployments/{id}/schedule", path_params={"id": deployment_id}, json=window
    )
    response.raise_for_status()
    by_deployment = FlowRunFilterDeploymentId(any_=[deployment_id])
    # The server's own scheduler may have made later ones too (a new deployment is "recent"):
    # the earliest is the one due within the 5 minutes a job accepts as its as_of.
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=by_deployment),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
    run = runs[0]
    assert run.auto_scheduled and run.created_by.type == "SCHEDULE", run
    return deployment_id, run


def wait_for_slot(client: Any, run: Any) -> None:
    """The run as Prefect leaves it when a deployment that queues (``ENQUEUE``) has its
    slot taken, at the moment its wait ends (Prefect sets the wait's end some seconds ahead;
    the engine would only sleep until then)."""
    waiting = Scheduled(name="AwaitingConcurrencySlot", scheduled_time=datetime.now(UTC))
    client.set_flow_run_state(run.id, waiting, force=True)


def start(client: Any, run: Any) -> Any:
    return run_flow(orphan_probe_job, flow_run=client.read_flow_run(run.id), return_type="state")


CHANGES = {
    "deleted": "no longer exists on the deployment",
    "paused": "is paused",
    # The probe's cron is */5: the run is at a minute the new cron never fires.
    "edited": "no longer fires at",
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_run_of_a_removed_paused_or_edited_schedule_is_cancelled_before_the_job(
    change: str,
) -> None:
    RAN.clear()
    with get_client(sync_client=True) as client:
        # Due minutes after the change, however slow the machine: a run of an edited cron
        # due before the edit would still run (the orphan check comes before the job's
        # as_of check, so a run this far ahead is refused as an orphan, not as early).
        later = datetime.now(UTC) + timedelta(minutes=2)
        deployment_id, run = scheduled_run(client, since=later)
        wait_for_slot(client, run)
        [schedule] = client.read_deployment_schedules(deployment_id)
        if change == "deleted":
            client.delete_deployment_schedule(deployment_id, schedule.id)
        elif change == "paused":
            client.update_deployment_schedule(deployment_id, schedule.id, active=False)
        else:
            edit = CronSchedule(cron="1-59/5 * * * *")
            client.update_deployment_schedule(deployment_id, schedule.id, schedule=edit)
        assert client.read_flow_run(run.id).state_name == "AwaitingConcurrencySlot"  # kept

        state = start(client, run)

        assert state.is_cancelled(), state
        assert str(schedule.id) in state.message and "orphan-probe-job: not run" in state.message
        assert CHANGES[change] in state.message
        assert client.read_flow_run(run.id).state_type.value == "CANCELLED"
    assert RAN == []


def test_a_run_of_an_active_schedule_does_its_job() -> None:
    RAN.clear()
    with get_client(sync_client=True) as client:
        _, run = scheduled_run(client)
        wait_for_slot(client, run)

        state = start(client, run)

        assert state.is_completed(), state
    assert RAN == [run.expected_start_time]


def test_a_run_whose_schedule_a_redeploy_replaced_by_an_equal_one_does_its_job() -> None:
    """``prefect deploy`` recreates a slug-less schedule under a new id: a run of the old
    one already due is no orphan, since the new one fires at its time."""
    RAN.clear()
    name = f"orphans-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        deployment_id, run = scheduled_run(client, name)
        wait_for_slot(client, run)
        [before] = client.read_deployment_schedules(deployment_id)
        assert deploy_probe(client, name) == deployment_id  # the upsert
        [after] = client.read_deployment_schedules(deployment_id)
        assert after.id != before.id and run.created_by.id == before.id

        state = start(client, run)

        assert state.is_completed(), state
    assert RAN == [run.expected_start_time]


def test_a_run_of_an_edited_cron_due_before_the_edit_still_runs() -> None:
    """A run the old cron made, due before the edit (Late, here queued for the slot), is
    kept by Prefect and runs, as it would have had the cron not changed: only the old
    cron's runs due after the edit are orphans."""
    RAN.clear()
    with get_client(sync_client=True) as client:
        since = datetime.now(UTC) - timedelta(minutes=9)
        deployment_id, run = scheduled_run(client, since=since)
        assert run.expected_start_time < datetime.now(UTC), run.expected_start_time
        wait_for_slot(client, run)
        [schedule] = client.read_deployment_schedules(deployment_id)
        edit = CronSchedule(cron="1-59/5 * * * *")
        client.update_deployment_schedule(deployment_id, schedule.id, schedule=edit)
        [edited] = client.read_deployment_schedules(deployment_id)
        assert edited.updated > run.expected_start_time, (edited.updated, run)

        state = start(client, run)

        assert state.is_completed(), state
    assert RAN == [run.expected_start_time]


def test_a_run_whose_schedules_cannot_be_read_does_its_job(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check's read of the schedules fails (the server unreachable for that one call):
    the job runs, with a warning, even for a run the rule would refuse — a server hiccup
    must not cost a scheduled run."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    RAN.clear()
    with get_client(sync_client=True) as client:
        # Due already (the job refuses an as_of minutes ahead); its schedule then paused.
        deployment_id, run = scheduled_run(client, since=datetime.now(UTC) - timedelta(minutes=9))
        wait_for_slot(client, run)
        [schedule] = client.read_deployment_schedules(deployment_id)
        client.update_deployment_schedule(deployment_id, schedule.id, active=False)

        def unreachable(self: Any, deployment_id: Any) -> Any:
            raise httpx.ConnectError("All connection attempts failed")

        monkeypatch.setattr(SyncPrefectClient, "read_deployment_schedules", unreachable)
        state = start(client, run)

        assert state.is_completed(), state
    assert RAN == [run.expected_start_time]
    assert any(
        r.getMessage().startswith(f"could not check the schedules of run {run.id}'s deployment")
        and "All connection attempts failed" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
