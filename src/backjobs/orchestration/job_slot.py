"""The job's one slot: which run holds a deployment's slot, and whether it covers a trigger.

Each deployment runs one run at a time (``CANCEL_NEW``): a run that finds another holding
the slot is Cancelled ("Deployment concurrency limit reached."), typically when the
worker picked up the ``*/2`` email run a few seconds early (:func:`lost_the_slot`).
:func:`slot_holder` finds the run holding it. A holder **covers** a trigger when it acts
at the same clock or later (:func:`covers`): without ``--as-of``, a holder whose
``as_of`` (its parameter, else its scheduled time: :func:`run_as_of`) is at or after the
moment of the trigger; with ``--as-of``, a holder with exactly that ``as_of`` (an older
or newer clock is another day's work). ``backjobs trigger --wait`` follows a covering
holder and queues behind any other (:mod:`backjobs.orchestration.trigger`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

SLOT_TAKEN = "Deployment concurrency limit reached"
ACTIVE = ("PENDING", "RUNNING", "CANCELLING")


def lost_the_slot(run: Any) -> bool:
    """Whether ``run`` was cancelled because another run held the deployment's slot."""
    state = run.state
    return bool(state is not None and state.is_cancelled() and SLOT_TAKEN in (state.message or ""))


def slot_holder(client: Any, deployment_id: UUID, *, exclude: Any) -> Any:
    """The run holding the deployment's slot: one Pending, Running or Cancelling; else,
    after ``exclude`` (our run) lost the slot, the run that ended since it was created —
    a quick holder may be done before we look. None when there is none."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # Scheduled runs never hold the slot, and Prefect sorts them by their (future) expected
    # start: left in, a scheduler keeping 100 future runs (Prefect's default) filled the
    # page and hid the Running holder.
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])),
        ),
        sort=FlowRunSort.START_TIME_DESC,
        limit=50,
    )
    others = [r for r in runs if exclude is None or r.id != exclude.id]
    active = [r for r in others if r.state is not None and str(r.state.type.value) in ACTIVE]
    if active:
        return min(active, key=lambda r: r.start_time or r.expected_start_time or r.created)
    if exclude is None:
        return None
    since = exclude.created
    ended = [
        r
        for r in others
        if r.state is not None
        and r.state.is_final()
        and r.start_time is not None
        and not lost_the_slot(r)
        and r.end_time is not None
        and since is not None
        and r.end_time >= since
    ]
    return min(ended, key=lambda r: r.end_time) if ended else None


def run_as_of(run: Any) -> datetime:
    """The clock a run of a job acts at: its ``as_of`` parameter, else its scheduled time
    (what the job base uses)."""
    from backjobs.clock import to_utc

    value = (run.parameters or {}).get("as_of")
    if isinstance(value, datetime):
        return to_utc(value)
    if isinstance(value, str):
        try:
            return to_utc(datetime.fromisoformat(value))
        except ValueError:
            pass
    return to_utc(run.expected_start_time or run.created)


def covers(holder: Any, *, as_of: datetime | None, asked_at: datetime) -> bool:
    """Whether ``holder`` does the work the trigger asked for (see the module docstring)."""
    held = run_as_of(holder)
    return held == as_of if as_of is not None else held >= asked_at
