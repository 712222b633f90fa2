"""The zombie signal: a Running run whose heartbeats stopped is set Crashed (issue 19).

The ``backjobs-<job>-zombie`` automation calls the receiver when a run sent no heartbeat
(nor a final state) for three heartbeat intervals. The run is re-read first: one that ended
meanwhile is left alone. The Crashed state's message says when the last heartbeat came and
which worker (and process) the run was on, so an operator can tell a dead machine from a
failure; Crashed frees the job's concurrency slot and alerts like any failure.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx

logger = logging.getLogger(__name__)


async def crash_if_running(
    api: httpx.AsyncClient, job: str, body: dict[str, Any], *, now: datetime
) -> str:
    flow_run_id = str(body["flow_run_id"])
    response = await api.get(f"/flow_runs/{flow_run_id}")
    response.raise_for_status()
    run = response.json()
    if run.get("state_type") != "RUNNING":  # ended meanwhile: a late heartbeat
        return f"ignored: the run is {run.get('state_name')}"
    message = zombie_message(run, body, now=now)
    answer = await api.post(
        f"/flow_runs/{flow_run_id}/set_state",
        json={"state": {"type": "CRASHED", "name": "Crashed", "message": message},
              "force": True},
    )  # fmt: skip
    answer.raise_for_status()
    logger.warning("%s: run %s marked Crashed: %s", job, flow_run_id, message)
    return "crashed"


def zombie_message(run: dict[str, Any], body: dict[str, Any], *, now: datetime) -> str:
    """The Crashed state's message: when the last heartbeat came, and the worker."""
    labels = run.get("labels") or {}
    worker = labels.get("prefect.worker.name") or "an unknown worker"
    pid = run.get("infrastructure_pid")
    where = f"worker {worker}" + (f" (process {pid})" if pid else "")
    last = _parse_time(body.get("last_heartbeat"))
    every = body.get("heartbeat_seconds")
    if last is None:
        since = "no heartbeat received"
    else:
        age = (now - last).total_seconds()
        since = f"last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC, {age:.0f} s before"
    cadence = f", expected every {every} s" if every else ""
    return f"Crashed by the zombie detector: heartbeats stopped ({since}{cadence}); ran on {where}."


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
