"""Which run holds a deployment's slot, read from a real Prefect server, when the scheduler
keeps many future runs (Prefect's default: up to 100 per deployment)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Running, Scheduled

from backjobs.orchestration.job_slot import slot_holder

pytestmark = pytest.mark.usefixtures("prefect_harness")

FUTURE_RUNS = 60  # more than the page slot_holder reads


def test_the_running_holder_is_found_behind_many_future_scheduled_runs() -> None:
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("slot-probe-job")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=f"slot-{uuid.uuid4().hex[:8]}"
        )
        now = datetime.now(UTC)
        running = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(running.id, Running(), force=True)
        for minutes in range(1, FUTURE_RUNS + 1):
            client.create_flow_run_from_deployment(
                deployment_id, state=Scheduled(scheduled_time=now + timedelta(minutes=minutes))
            )

        holder = slot_holder(client, deployment_id, exclude=None)

        assert holder is not None and holder.id == running.id, holder
