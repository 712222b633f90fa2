"""The zombie check against the test run's real Prefect server: the run it reads as stuck may
end before its state is set (its process was only slow), and then it must stay as it ended.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from backjobs.orchestration.alert_zombie import crash_if_stuck

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_a_run_that_completes_between_the_read_and_the_crash_stays_completed() -> None:
    api_url = PREFECT_API_URL.value()

    async def go() -> tuple[str, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=api_url) as api:
            flow = (await api.post("/flows/", json={"name": "zombie-check-race"})).json()
            running = {"type": "RUNNING", "name": "Running"}
            run = (
                await api.post("/flow_runs/", json={"flow_id": flow["id"], "state": running})
            ).json()

            async def completes_once_read(response: httpx.Response) -> None:
                if response.request.method == "GET":  # the check's read: Running
                    await response.aread()
                    done = {"state": {"type": "COMPLETED", "name": "Completed"}}
                    answer = await api.post(f"/flow_runs/{run['id']}/set_state", json=done)
                    assert answer.json()["status"] == "ACCEPT"

            async with httpx.AsyncClient(
                base_url=api_url, event_hooks={"response": [completes_once_read]}
            ) as racing:
                body = {"flow_run_id": run["id"], "last_heartbeat": "", "heartbeat_seconds": 30}
                outcome = await crash_if_stuck(racing, "cleanup-job", body, now=datetime.now(UTC))
            return outcome, (await api.get(f"/flow_runs/{run['id']}")).json()

    outcome, run = asyncio.run(go())

    assert run["state_type"] == "COMPLETED", run["state"]
    assert outcome.startswith("ignored: the server refused Crashed ("), outcome
