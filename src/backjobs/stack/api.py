"""What the local stack asks of its Prefect server, through Prefect's client.

Each coroutine runs under :func:`run`, which points the client at the stack's server with
its machine credential (whatever PREFECT_* the calling shell has).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from backjobs.orchestration.crons import next_fire
from backjobs.orchestration.orphan_runs import PAGE
from backjobs.orchestration.prefect_yaml import load_deployments

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from backjobs.stack.config import Stack

T = TypeVar("T")
STUCK_STATES = ("PENDING", "RUNNING", "CANCELLING")


def run(stack: Stack, coroutine: Coroutine[Any, Any, T]) -> T:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {
        PREFECT_API_URL: stack.api_url,
        PREFECT_API_AUTH_STRING: stack.auth_string,
    }
    with temporary_settings(updates=updates):
        return asyncio.run(coroutine)


def _client() -> PrefectClient:
    from prefect.client.orchestration import get_client

    return get_client()


async def unfinished_runs() -> int:
    """How many runs are Pending, Running or Cancelling: started and not yet ended (counted
    by the server, not read a page at a time)."""
    async with _client() as client:
        return int(await client.count_flow_runs(flow_run_filter=_stuck_filter()))


async def crash_stuck_runs(*, reason: str) -> int:
    """Mark every Pending, Running or Cancelling run Crashed (its process is gone): the
    first page of them again and again until none is left, as a run marked leaves the
    filter, so that more than a page of them are all marked."""
    from prefect.states import Crashed

    crashed: set[Any] = set()
    async with _client() as client:
        while True:
            page = await client.read_flow_runs(flow_run_filter=_stuck_filter(), limit=PAGE)
            fresh = [run for run in page if run.id not in crashed]
            if not fresh:  # none left, or the server keeps a run we marked (never loop)
                return len(crashed)
            for flow_run in fresh:
                await client.set_flow_run_state(
                    flow_run.id, Crashed(message=f"Crashed: {reason}"), force=True
                )
                crashed.add(flow_run.id)


def _stuck_filter() -> Any:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    wanted = [StateType(name) for name in STUCK_STATES]
    return FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=wanted)))


async def ensure_work_pools(stack: Stack) -> None:
    """Every work pool prefect.yaml names, a ``process`` pool with the locked-down template.

    Created when missing; an existing pool gets the template too (a stack made before
    the template existed offers ``command`` and ``env`` to runs).
    """
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    from backjobs.stack.pool import locked_process_template

    names = {
        str((d.get("work_pool") or {}).get("name") or "")
        for d in load_deployments(stack.project_file)
    } - {""}
    template = locked_process_template()
    async with _client() as client:
        for name in sorted(names):
            try:
                await client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template)
                )
            except ObjectAlreadyExists:
                await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


async def hold_work_pool(pool: str, marker: Path) -> bool:
    """Pause the stack worker's pool, so that the worker takes no new run while ``down``
    waits for the started ones (a run coming due in the wait would otherwise start, then
    be killed when the worker stops). True if this paused it.

    ``marker`` is written first, with the pool's name: it tells the next ``up`` to resume
    the pool. A pool paused already (by an operator, in the UI) is left alone, and stays
    paused.
    """
    from prefect.client.schemas.actions import WorkPoolUpdate

    async with _client() as client:
        if (await client.read_work_pool(pool)).is_paused:
            return False
        marker.write_text(f"{pool}\n")
        await client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
        return True


async def resume_held_work_pool(marker: Path) -> str | None:
    """Resume the pool the last ``down`` paused (:func:`hold_work_pool`); its name, or None
    when ``down`` paused none."""
    from prefect.client.schemas.actions import WorkPoolUpdate

    if not marker.exists():
        return None
    pool = marker.read_text().strip()
    async with _client() as client:
        await client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))
    marker.unlink()
    return pool


async def wait_worker_online(stack: Stack, *, timeout: float) -> None:
    from backjobs.stack import processes
    from backjobs.stack.config import WORK_POOL, WORKER, StackError

    deadline = time.monotonic() + timeout
    async with _client() as client:
        while time.monotonic() < deadline:
            if processes.running_pid(stack.folder, WORKER) is None:
                raise StackError(
                    f"the worker stopped while starting (log: {stack.folder / 'worker.log'})"
                )
            workers = await client.read_workers_for_work_pool(WORK_POOL)
            if any(str(getattr(w.status, "value", w.status)) == "ONLINE" for w in workers):
                return
            await asyncio.sleep(0.5)
    raise StackError(
        f"the worker is not online after {timeout:.0f} s (log: {stack.folder / 'worker.log'})"
    )


async def trigger_each(names: list[str]) -> list[str]:
    """One ad hoc run of each deployment (``as_of`` = the run's time); their names."""
    created = []
    async with _client() as client:
        for name in names:
            deployment = await client.read_deployment_by_name(f"{name}/{name}")
            flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters={})
            created.append(f"{name}: {flow_run.name}")
    return created


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    schedules: list[str]  # "0 23 * * * (UTC)", "… inactive"
    next_run: datetime | None


async def deployment_statuses(stack: Stack) -> list[DeploymentStatus]:
    """Each deployment of prefect.yaml as the server holds it; the next run from its crons."""
    from prefect.exceptions import ObjectNotFound

    found = []
    async with _client() as client:
        for entry in load_deployments(stack.project_file):
            name = str(entry.get("name"))
            try:
                deployment = await client.read_deployment_by_name(f"{name}/{name}")
            except ObjectNotFound:
                found.append(DeploymentStatus(name, ["not deployed"], None))
                continue
            schedules = [_describe(s) for s in deployment.schedules]
            now = datetime.now(UTC)
            upcoming = [next_fire(s.schedule, now) for s in deployment.schedules if s.active]
            next_run = min((t for t in upcoming if t is not None), default=None)
            found.append(DeploymentStatus(name, schedules or ["none (trigger only)"], next_run))
    return found


def _describe(schedule: Any) -> str:
    cron = getattr(schedule.schedule, "cron", schedule.schedule)
    zone = getattr(schedule.schedule, "timezone", None) or "UTC"
    return f"{cron} ({zone})" + ("" if schedule.active else " inactive")
