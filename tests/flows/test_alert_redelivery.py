"""Which automation calls the receiver delivers again, read from a real Prefect server's event
log: the call events Prefect writes (``prefect.automation.action.executed`` with the answer's
status, ``prefect.automation.action.failed``), posted here as its actions service would."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.states import Completed, Running

from backjobs.orchestration.alert_redelivery import (
    Undelivered,
    completed_since,
    undelivered_calls,
)
from backjobs.orchestration.automations import wanted_automations
from tests.support.alerts import call_event, event, post_retried

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def scenario() -> None:
    job = f"redelivery-{uuid.uuid4().hex[:8]}-job"
    deployment = str(uuid.uuid4())
    [alert, *_] = wanted_automations(
        job, deployment, block_id=str(uuid.uuid4()), silent_after=None, heartbeat_seconds=30
    )
    async with httpx.AsyncClient(base_url=PREFECT_API_URL.value(), timeout=30) as api:
        created = (await post_retried(api, "/automations/", alert)).json()
        now = datetime.now(UTC)
        runs = [str(uuid.uuid4()) for _ in range(4)]
        triggers = [
            event("prefect.flow-run.Failed", {"prefect.resource.id": f"prefect.flow-run.{r}"},
                  now - timedelta(seconds=40 - i))
            for i, r in enumerate(runs)
        ]  # fmt: skip
        replaced = created | {"id": str(uuid.uuid4())}  # a deploy replaced it since: new id
        calls = [
            call_event(created, triggers[0], now - timedelta(seconds=30), status_code=204),
            call_event(created, triggers[1], now - timedelta(seconds=29), status_code=401),
            call_event(replaced, triggers[2], now - timedelta(seconds=28),
                       reason="Webhook call failed: ReadError('')"),
            call_event(created, triggers[3], now - timedelta(seconds=27), status_code=503),
        ]  # fmt: skip
        await post_retried(api, "/events", triggers + calls)
        window = {"since": now - timedelta(minutes=1), "until": now}

        async def calls_of_job(**query: Any) -> list[Undelivered]:
            # The server is shared: other tests' calls may fall in the same window.
            return [c for c in await undelivered_calls(api, **query) if c.job == job]

        deadline = time.monotonic() + 60
        while len(found := await calls_of_job(**window, handled=set())) < 3:
            assert time.monotonic() < deadline, f"the call events were not stored: {found}"
            await asyncio.sleep(0.5)

        assert [(c.event_id, c.why) for c in found] == [
            (calls[1]["id"], "answered 401"),
            (calls[2]["id"], "Webhook call failed: ReadError('')"),
            (calls[3]["id"], "answered 503"),
        ]
        assert [c.body for c in found] == [
            {"signal": "state", "job": job, "deployment_id": deployment, "flow_run_id": run,
             "event_id": trigger["id"], "event": "prefect.flow-run.Failed"}
            for run, trigger in zip(runs[1:], triggers[1:], strict=True)
        ]  # fmt: skip
        handled = {calls[1]["id"]}
        again = await calls_of_job(**window, handled=handled)
        assert [c.event_id for c in again] == [calls[2]["id"], calls[3]["id"]]
        later = await calls_of_job(
            since=now - timedelta(seconds=28), until=now, handled={calls[2]["id"]}
        )
        assert [c.event_id for c in later] == [calls[3]["id"]]


def test_calls_that_failed_or_were_answered_with_an_error_are_rebuilt_oldest_first() -> None:
    asyncio.run(scenario())


async def silence_then_a_completed_run() -> None:
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("silence-probe-job")
        deployment = await client.create_deployment(
            flow_id=flow_id, name=f"silence-{uuid.uuid4().hex[:8]}"
        )
        other = await client.create_deployment(
            flow_id=flow_id, name=f"silence-{uuid.uuid4().hex[:8]}"
        )
        before = datetime.now(UTC) - timedelta(seconds=5)
        run = await client.create_flow_run_from_deployment(deployment)
        await client.set_flow_run_state(run.id, Running(), force=True)
        await client.set_flow_run_state(run.id, Completed(), force=True)
        ended = (await client.read_flow_run(run.id)).end_time
        assert ended is not None
    async with httpx.AsyncClient(base_url=PREFECT_API_URL.value(), timeout=30) as api:
        assert await completed_since(api, str(deployment), before) is True  # stale silence
        assert await completed_since(api, str(deployment), ended + timedelta(seconds=1)) is False
        assert await completed_since(api, str(other), before) is False


def test_a_silent_call_is_stale_once_a_run_of_its_deployment_completed_after_it() -> None:
    asyncio.run(silence_then_a_completed_run())
