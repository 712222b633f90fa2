"""The zombie signal: a run whose heartbeats stopped, or that never started, is set Crashed.

The ``backjobs-<job>-zombie`` automation calls the receiver when a run sent no heartbeat
(nor a final state) for three heartbeat intervals after its last heartbeat, after it went
Running (its heartbeats had not begun), or after it went Pending (its worker took it and no
process of it ever ran: the worker died first). The run is re-read first: one that ended,
or moved on, meanwhile is left alone; and the new state is proposed, not forced, so a run
that ends between that read and the write keeps its end (Prefect refuses Crashed over a
final state; a forced Crashed overwrote a Completed run and alerted a failure that never
happened). The Crashed state's message says what was last heard
and when, and which worker (and process) the run was on, so an operator can tell a dead
machine from a failure; Crashed frees the job's concurrency slot and alerts like any failure.

A run being cancelled (**Cancelling**) whose heartbeats stopped is set **Cancelled**: the
cancel is what its user asked for, and the worker that was to finish it is gone with the
run's process. Left alone it stayed Cancelling for good, holding the job's slot — and
cancelling a run that looks stuck is what an operator does first after a machine dies.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx

logger = logging.getLogger(__name__)

STUCK = ("RUNNING", "PENDING", "CANCELLING")  # the states a dead process leaves a run in
HEARTBEAT = "prefect.flow-run.heartbeat"
PENDING = "prefect.flow-run.Pending"


async def crash_if_stuck(
    api: httpx.AsyncClient, job: str, body: dict[str, Any], *, now: datetime
) -> str:
    flow_run_id = str(body["flow_run_id"])
    response = await api.get(f"/flow_runs/{flow_run_id}")
    response.raise_for_status()
    run = response.json()
    if run.get("state_type") not in STUCK:  # ended meanwhile, or a late heartbeat
        return f"ignored: the run is {run.get('state_name')}"
    state = zombie_state(run, body, now=now)
    # Proposed, not forced: the run may have ended since it was read (its process was only
    # slow), and Prefect's rules refuse Crashed over a final state, where a forced Crashed
    # overwrote a Completed run and alerted a failure that never happened.
    answer = await api.post(f"/flow_runs/{flow_run_id}/set_state", json={"state": state})
    answer.raise_for_status()
    outcome = answer.json()
    if outcome.get("status") != "ACCEPT":
        reason = (outcome.get("details") or {}).get("reason") or outcome.get("status")
        return f"ignored: the server refused {state['name']} ({reason})"
    logger.warning("%s: run %s marked %s: %s", job, flow_run_id, state["name"], state["message"])
    return state["name"].lower()


def zombie_state(run: dict[str, Any], body: dict[str, Any], *, now: datetime) -> dict[str, str]:
    """The state the zombie check sets on ``run`` (as the server has it): Crashed, or
    Cancelled for a run being cancelled; its message says what was last heard and when,
    and the worker."""
    what = _what_stopped(run, body, now=now)
    if run.get("state_type") == "CANCELLING":
        return {"type": "CANCELLED", "name": "Cancelled",
                "message": f"Cancelled by the zombie detector: no worker finished cancelling"
                           f" it, and {what}."}  # fmt: skip
    return {"type": "CRASHED", "name": "Crashed",
            "message": f"Crashed by the zombie detector: {what}."}  # fmt: skip


def _what_stopped(run: dict[str, Any], body: dict[str, Any], *, now: datetime) -> str:
    """What the server last heard of the run, when, and from where: "the run never started
    (…)" or "heartbeats stopped (…); ran on …". ``last_event`` (the event that opened the
    window) is missing from the calls of automations an older deploy made: a heartbeat was
    then the only event that opened it."""
    labels = run.get("labels") or {}
    worker = labels.get("prefect.worker.name")
    last = _parse_time(body.get("last_heartbeat"))
    at = "an unknown time"
    if last is not None:
        at = f"{last:%Y-%m-%d %H:%M:%S} UTC, {(now - last).total_seconds():.0f} s before"
    event = str(body.get("last_event") or HEARTBEAT)
    state = run.get("state_type")
    if state == "PENDING" or (state == "CANCELLING" and event == PENDING):
        # A worker names itself on a run once the run's process starts.
        taker = f"worker {worker}" if worker else "a worker"
        if run.get("work_pool_name"):
            taker += f" of pool '{run['work_pool_name']}'"
        return (
            f"the run never started (Pending since {at}: {taker} took it and no process of it ran)"
        )
    pid = run.get("infrastructure_pid")
    where = (f"worker {worker}" if worker else "an unknown worker") + (
        f" (process {pid})" if pid else ""
    )
    if last is None:
        since = "no heartbeat received"
    elif event == HEARTBEAT:
        since = f"last heartbeat {at}"
    else:
        since = f"no heartbeat since it went Running at {at}"
    every = body.get("heartbeat_seconds")
    cadence = f", expected every {every} s" if every else ""
    return f"heartbeats stopped ({since}{cadence}); ran on {where}"


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
