"""The heartbeat ``backjobs deploy`` sizes a zombie window by is the one the deployment's runs
get: read from its pool's job template and its job variables as the test run's Prefect
server holds them (too short a window would crash healthy runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.workers.process import ProcessWorker

from backjobs.orchestration.automations import Heartbeat, deployment_heartbeat
from backjobs.stack.pool import locked_process_template

pytestmark = pytest.mark.usefixtures("prefect_harness")

SETTING = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def heartbeat_of(
    template: dict[str, Any],
    job_variables: dict[str, Any],
    *,
    after_deploy: Callable[[Any, str], Awaitable[Any]] | None = None,
) -> Heartbeat:
    """Create a pool with ``template`` and a deployment on it (then ``after_deploy(client,
    pool)``, if given); the heartbeat deploy reads for that deployment from the server."""

    async def go() -> Heartbeat:
        pool = f"zombie-window-{uuid.uuid4().hex[:8]}"
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template)
            )
            flow_id = await client.create_flow_from_name("zombie-window-probe")
            deployment_id = await client.create_deployment(
                flow_id=flow_id, name=pool, work_pool_name=pool, job_variables=job_variables
            )
            if after_deploy is not None:
                await after_deploy(client, pool)
            deployment = await client.read_deployment(deployment_id)
            return await deployment_heartbeat(client, deployment)

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def _no_heartbeat_in_this_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SETTING, raising=False)


def test_the_backjobs_pool_gives_its_runs_30_s() -> None:
    beat = heartbeat_of(locked_process_template(), {})
    assert (beat.seconds, beat.problem) == (30, None)
    assert beat.source.startswith("from the job template of pool 'zombie-window-")


def test_a_deployment_setting_it_in_a_default_pool_is_read() -> None:
    default = ProcessWorker.get_default_base_job_template()
    beat = heartbeat_of(default, {"env": {SETTING: "90"}})
    assert (beat.seconds, beat.problem) == (90, None)


def test_a_pool_that_leaves_it_to_the_workers_gets_prefects_default_or_this_shells(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = ProcessWorker.get_default_base_job_template()
    beat = heartbeat_of(default, {})
    assert beat.seconds == 180 and beat.source.startswith("Prefect's default (pool "), beat
    monkeypatch.setenv(SETTING, "45")
    beat = heartbeat_of(default, {})
    assert beat.seconds == 45 and beat.source.startswith(f"this shell's {SETTING}"), beat


def test_a_deployment_whose_pool_was_deleted_leaves_it_to_the_workers() -> None:
    beat = heartbeat_of(
        locked_process_template(),
        {},
        after_deploy=lambda client, pool: client.delete_work_pool(pool),
    )
    assert beat.seconds == 180 and "leaves" in beat.source, beat


def test_a_value_the_runs_would_refuse_is_reported() -> None:
    template = locked_process_template()
    template["job_configuration"]["env"][SETTING] = "10"
    beat = heartbeat_of(template, {})
    assert beat.seconds == 180
    assert beat.problem and f"sets {SETTING}='10'" in beat.problem, beat


def test_a_template_that_cannot_be_filled_in_is_reported_and_gets_the_longest_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool's heartbeat comes from a Secret block deleted since: the worker could not
    start a run either. Nothing is known of the runs, so not even this shell's value."""
    monkeypatch.setenv(SETTING, "30")
    block_id = str(Secret(value="30").save(f"zombie-window-{uuid.uuid4().hex[:8]}"))
    template = locked_process_template()
    ref = {"$ref": {"block_document_id": block_id}}
    template["variables"]["properties"]["beat"] = {"type": "object", "default": ref}
    template["job_configuration"]["env"][SETTING] = "{{ beat }}"
    beat = heartbeat_of(
        template, {}, after_deploy=lambda client, _: client.delete_block_document(block_id)
    )
    assert beat.seconds == 180, beat
    assert beat.problem and "cannot be filled in" in beat.problem, beat
    assert block_id in beat.problem, beat
