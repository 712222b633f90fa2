"""``backjobs trigger``: a run of a job's deployment on the server, optionally waited for.

With ``--wait`` the command first makes sure somebody will run it: the deployment's work
pool must exist, not be paused, and have at least one worker ``ONLINE`` (a worker that
sent a heartbeat recently). Otherwise it says so at once and creates nothing, rather than
leaving a run Late and the operator waiting forever. While waiting it prints each state
change; at the end, the run's counts (its ``<flow>-result`` artifact) and, when it did not
complete, the failed parts by name with their reasons.

Exit status: 0 the run completed (or was created, without ``--wait``); 1 it ended
otherwise (failed, cancelled, crashed); 3 no worker polls its pool (nothing created);
4 ``--timeout`` passed first (the run goes on; its id is printed).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import IO, Any
from uuid import UUID

NO_WORKER = 3
TIMED_OUT = 4


def trigger_deployment(
    name: str,
    *,
    as_of: datetime | None,
    wait: bool,
    timeout: float | None = None,
    poll_seconds: float = 1.0,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Create a run of deployment ``name/name``; with ``wait``, follow it to its end."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    full_name = f"{name}/{name}"
    parameters = {} if as_of is None else {"as_of": as_of.isoformat()}
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            raise LookupError(
                f"deployment {full_name} is not on the server; deploy prefect.yaml first"
            ) from None
        if wait:
            problem = pool_problem(client, deployment.work_pool_name)
            if problem:
                print(f"{full_name}: not triggered: {problem}", file=err)
                return NO_WORKER
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        print(f"{full_name}: flow run {run.name} ({run.id}): {_state_name(run.state)}", file=out)
        if not wait:
            return 0
        return _follow(client, name, run.id, timeout, poll_seconds, out, err)


def pool_problem(client: Any, pool_name: str | None) -> str | None:
    """Why no worker would run a flow run on ``pool_name`` now, or None."""
    from prefect.client.schemas.objects import WorkerStatus, WorkPoolStatus
    from prefect.exceptions import ObjectNotFound

    if not pool_name:
        return "the deployment has no work pool"
    try:
        pool = client.read_work_pool(pool_name)
    except ObjectNotFound:
        return f"work pool {pool_name!r} does not exist"
    if pool.status == WorkPoolStatus.PAUSED or pool.is_paused:
        return f"work pool {pool_name!r} is paused (prefect work-pool resume {pool_name})"
    workers = client.read_workers_for_work_pool(pool_name)
    if not any(w.status == WorkerStatus.ONLINE for w in workers):
        return (
            f"no worker polls work pool {pool_name!r}; start one with "
            f"`prefect worker start --pool {pool_name}`"
        )
    return None


def _follow(
    client: Any,
    name: str,
    run_id: UUID,
    timeout: float | None,
    poll_seconds: float,
    out: IO[str],
    err: IO[str],
) -> int:
    started = time.monotonic()
    shown = None
    while True:
        run = client.read_flow_run(run_id)
        state = run.state
        elapsed = time.monotonic() - started
        if state is not None and state.name != shown:
            shown = state.name
            print(f"  {elapsed:6.1f}s  {state.name}", file=out)
        if state is not None and state.is_final():
            break
        if timeout is not None and elapsed >= timeout:
            print(
                f"{name}: still {_state_name(state)} after {timeout:g} s; the run goes on "
                f"(prefect flow-run inspect {run_id})",
                file=err,
            )
            return TIMED_OUT
        time.sleep(poll_seconds if timeout is None else min(poll_seconds, timeout - elapsed))
    rows = result_table(client, run_id, f"{name}-result")
    for row in rows:
        print(f"  {row['count']:<28} {row['value']}", file=out)
    if state.is_completed():
        print(f"{name}: completed", file=out)
        return 0
    print(f"{name}: run {run.name} ended {state.name}: {state.message}", file=err)
    failed = {row["value"] for row in rows if row["count"] == "failed_parts"}
    parts = ", ".join(sorted(failed - {"none"})) or "none reported"
    print(f"  failed parts: {parts}", file=err)
    for task_name, message in failed_tasks(client, run_id):
        print(f"  {task_name}: {message}", file=err)
    return 1


def result_table(client: Any, run_id: UUID, key: str) -> list[dict[str, str]]:
    """The rows of the run's latest ``key`` table artifact ([] when none)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            key=ArtifactFilterKey(any_=[key]),
        )
    )
    if not artifacts:
        return []
    latest = max(artifacts, key=lambda a: a.created)
    data = latest.data
    rows = json.loads(data) if isinstance(data, str) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def failed_tasks(client: Any, run_id: UUID) -> list[tuple[str, str]]:
    """(task name, state message) of the run's failed task runs, as recorded so far."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    )
    return [
        (t.name.rsplit("-", 1)[0], t.state.message or t.state.name)
        for t in task_runs
        if t.state is not None and t.state.is_failed()
    ]


def _state_name(state: Any) -> str:
    return str(state.name) if state is not None else "unknown"
