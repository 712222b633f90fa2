"""Runs of a schedule that is gone or changed: ``backjobs deploy`` deletes them, a job run
refuses them.

Removing, pausing or changing a schedule makes Prefect delete the schedule's future runs,
but not all of them:

- **the scheduler's race.** Prefect's scheduler reads a deployment's active schedules and
  inserts their runs in two transactions. A schedule deleted or changed between the two (a
  deploy while the scheduler is in its pass; on a busy server the gap is seconds) gets runs
  inserted after the change: the job keeps running on a schedule that no longer exists
  (seen in CI: 13 runs of a removed ``*/5`` cron), or at the times of a cron that was
  edited (a changed cron keeps its schedule's id: the runs of the old cron are still the
  active schedule's, for up to the scheduler's 100 runs ahead);
- **runs queued for a concurrency slot.** A run in ``AwaitingConcurrencySlot`` is kept by
  Prefect when its schedule goes or changes, and runs later. (backjobs' deployments cancel
  a run that finds the slot taken, ``CANCEL_NEW``; one whose prefect.yaml says ``ENQUEUE``
  queues.)

Such a run is an *orphan*: auto-scheduled, never started (``run_count`` 0), still in a
Scheduled-type state, made by a schedule (``created_by``) that

- is no longer an active schedule of its deployment, or
- is one whose cron no longer fires at the run's time, the run being due after the
  schedule last changed (one due before the edit — Late, or queued for the slot — still
  runs, as Prefect keeps it),

at a time no active schedule of the deployment fires (so a run whose schedule ``prefect
deploy`` replaced by an equal one is no orphan). Whether a cron fires at a time is asked of
Prefect's own schedule code (:mod:`backjobs.orchestration.crons`), so a run the scheduler
made for the current cron, on a day clocks change too, is never taken for an orphan; a
schedule that is no cron, or a cron that cannot be computed, is taken to fire at any time.
``backjobs deploy`` deletes every orphan it finds once the schedules are synced
(:func:`delete_orphaned_runs`), and says how many. One inserted after that (the race
again) is refused when it starts: the job base ends it **Cancelled**, with a message
naming the schedule, before the job does anything (:func:`orphaned_run_reason`).
If the schedules cannot be read at that moment, the job runs: a server hiccup must not
cost a scheduled run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC
from typing import Any

from backjobs.orchestration.crons import fires_at

logger = logging.getLogger(__name__)

SCHEDULE = "SCHEDULE"  # created_by.type of a run the scheduler made
ORPHANED_BY = "removed, paused or changed schedules"  # whose runs deploy deletes
PAGE = 200  # the server's largest page of flow runs


def orphan_reason(run: Any, schedules: Iterable[Any]) -> str | None:
    """Why ``run`` (a Prefect flow run) belongs to no active schedule of its deployment,
    or None when it is not such a run: not made by a schedule, its schedule is active and
    fires at its time, or another active schedule fires at its time. ``schedules``: the
    deployment's schedules as the server has them now.

    The last case keeps a run whose schedule was *replaced* by an equal one: ``prefect
    deploy`` recreates (new ids) the schedules of a deployment whose schedules lack a
    ``slug``, and keeps their runs already due (Late, or taken by a worker), which must
    still run."""
    created = getattr(run, "created_by", None)
    if not getattr(run, "auto_scheduled", False) or created is None:
        return None
    if created.type != SCHEDULE or created.id is None:
        return None
    schedules = list(schedules)
    name = f"schedule {created.display_value or 'of the deployment'} ({created.id})"
    mine = next((s for s in schedules if s.id == created.id), None)
    when = getattr(run, "expected_start_time", None)
    if when is not None and any(s.active and fires_at(_of(s), when) for s in schedules):
        return None
    if mine is None:
        return f"{name} no longer exists on the deployment"
    if not mine.active:
        return f"{name} is paused"
    # Its own schedule is active but no longer fires at its time: the cron was edited. A run
    # due before that edit (Late, or queued for a slot) is kept, as Prefect keeps it; one due
    # after it is a run of the old cron Prefect meant to delete. Without both times: kept.
    edited = getattr(mine, "updated", None)
    if when is None or edited is None or when <= edited:
        return None
    current = _of(mine)
    cron, zone = getattr(current, "cron", None), getattr(current, "timezone", None) or "UTC"
    at = f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    return f"{name} no longer fires at {at} (its cron is now `{cron}`, {zone})"


def _of(deployment_schedule: Any) -> Any:
    return getattr(deployment_schedule, "schedule", None)


def is_unstarted(run: Any) -> bool:
    """Scheduled-type (Scheduled, Late, AwaitingConcurrencySlot), never run."""
    state = getattr(run, "state", None)
    return bool(state is not None and state.type.value == "SCHEDULED" and (run.run_count or 0) == 0)


async def delete_orphaned_runs(client: Any, deployment_id: Any) -> int:
    """Delete the deployment's unstarted runs of schedules it no longer has (or has
    paused); the number deleted."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    schedules = list(await client.read_deployment_schedules(deployment_id))
    wanted = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
    )
    deleted, offset = 0, 0
    while True:
        page = await client.read_flow_runs(flow_run_filter=wanted, limit=PAGE, offset=offset)
        orphans = [r for r in page if is_unstarted(r) and orphan_reason(r, schedules)]
        for run in orphans:
            await client.delete_flow_run(run.id)
        deleted += len(orphans)
        if len(page) < PAGE:
            return deleted
        offset += PAGE - len(orphans)


def orphaned_run_reason() -> str | None:
    """In a flow run: why this run must not do its job (its schedule is gone or paused),
    else None. Runs outside a deployment, or not made by a schedule, are never refused."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.deployment_id is None or orphan_reason(run, []) is None:
        return None  # orphan_reason with no schedules: None only if no schedule made it
    try:
        with get_client(sync_client=True) as client:
            schedules = client.read_deployment_schedules(run.deployment_id)
        reason = orphan_reason(run, schedules)
    except Exception as exc:  # the job runs: a hiccup must not cost a scheduled run
        logger.warning("could not check the schedules of run %s's deployment (%s); "
                       "running the job", run.id, exc)  # fmt: skip
        return None
    if reason is None:
        return None
    return f"not run: {reason}; the run was made from the schedule before it changed"
