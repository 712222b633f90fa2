"""``backjobs trigger``: a run of a job's deployment on the server, optionally waited for.

With ``--wait`` the command first makes sure somebody will run it: the deployment's work
pool must exist, not be paused, and have at least one worker ``ONLINE`` (a worker that
sent a heartbeat recently). Otherwise it says so at once and creates nothing, rather than
leaving a run Late and the operator waiting forever. While waiting it prints each state
change; at the end, the run's counts (its ``<flow>-result`` artifact) and, when it did not
complete, the failed parts by name with their reasons.

**The job's one slot** (:mod:`backjobs.orchestration.job_slot`). A run that finds
another holding the slot is Cancelled; with ``--wait`` a trigger never just ends so. When
the run holding the slot **covers** the trigger, it follows that run and reports its
outcome instead; otherwise it **queues behind** it: waits for it to end, then creates its
run again. It says which. A holder already running when the trigger starts is handled
the same way before anything is created, so no Cancelled run is left behind. Without
``--wait`` the run is created and a note names the holder.

Exit status: 0 the run completed (or was created, without ``--wait``); 1 it ended
otherwise (failed, cancelled, crashed); 3 no worker polls its pool (nothing created);
4 ``--timeout`` passed first (the run goes on; its id is printed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any
from uuid import UUID

from backjobs.orchestration.job_slot import (
    SLOT_TAKEN,
    covers,
    lost_the_slot,
    run_as_of,
    slot_holder,
)

NO_WORKER = 3
TIMED_OUT = 4
MAX_REQUEUES = 5  # a run cancelled again and again (a schedule every few seconds) stops here


@dataclass
class _Waiting:
    """What one ``--wait`` follows: where it prints, and when it gives up."""

    client: Any
    name: str
    out: IO[str]
    err: IO[str]
    poll_seconds: float
    deadline: float | None
    started: float


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

    full_name = f"{name}/{name}"
    asked_at = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        deployment = _read_deployment(client, full_name)
        if wait:
            problem = pool_problem(client, deployment.work_pool_name)
            if problem:
                print(f"{full_name}: not triggered: {problem}", file=err)
                return NO_WORKER
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        waiting = _Waiting(client, name, out, err, poll_seconds, deadline, started)
        holder = slot_holder(client, deployment.id, exclude=None)
        if not wait:
            if holder is not None:
                _note_holder(name, holder, out)
            _create(client, deployment.id, full_name, as_of, out)
            return 0
        if holder is not None:
            settled = _meet_holder(waiting, holder, as_of=as_of, asked_at=asked_at, run=None)
            if settled is not None:
                return settled
        return _run_until_settled(waiting, deployment.id, as_of=as_of, asked_at=asked_at)


def _read_deployment(client: Any, full_name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        raise LookupError(
            f"deployment {full_name} is not on the server; deploy prefect.yaml first"
        ) from None


def _note_holder(name: str, holder: Any, out: IO[str]) -> None:
    print(
        f"{name}: note: run {holder.name} ({_state_name(holder.state)}) holds the job's "
        "slot; this run is cancelled if a worker picks it up before that one ends "
        "(--wait queues behind it)",
        file=out,
    )


def _run_until_settled(
    waiting: _Waiting, deployment_id: UUID, *, as_of: datetime | None, asked_at: datetime
) -> int:
    """Create the run and follow it; when it loses the slot, follow or queue behind the
    holder (:func:`_meet_holder`), at most :data:`MAX_REQUEUES` times."""
    full_name = f"{waiting.name}/{waiting.name}"
    for _ in range(MAX_REQUEUES):
        run = _create(waiting.client, deployment_id, full_name, as_of, waiting.out)
        final = _wait_final(waiting, run.id)
        if final is None:
            return TIMED_OUT
        if not lost_the_slot(final):
            return _report(waiting, final)
        holder = slot_holder(waiting.client, deployment_id, exclude=final)
        settled = _meet_holder(waiting, holder, as_of=as_of, asked_at=asked_at, run=final)
        if settled is not None:
            return settled
    print(
        f"{waiting.name}: cancelled {MAX_REQUEUES} times by runs holding the slot; giving up",
        file=waiting.err,
    )
    return _report(waiting, final)


def _create(
    client: Any, deployment_id: UUID, full_name: str, as_of: datetime | None, out: IO[str]
) -> Any:
    parameters = {} if as_of is None else {"as_of": as_of.isoformat()}
    run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    print(f"{full_name}: flow run {run.name} ({run.id}): {_state_name(run.state)}", file=out)
    return run


def _meet_holder(
    waiting: _Waiting,
    holder: Any,
    *,
    as_of: datetime | None,
    asked_at: datetime,
    run: Any,
) -> int | None:
    """Follow a covering ``holder`` (its exit status), or wait for it to end so the caller
    creates its run again (None). ``run``: ours, cancelled by the holder, if any."""
    name = waiting.name
    lost = f"run {run.name} was cancelled ({SLOT_TAKEN.lower()}): " if run is not None else ""
    if holder is None:
        print(
            f"{name}: {lost}the run that held the slot has ended; creating the run again",
            file=waiting.out,
        )
        return None
    held_as_of = run_as_of(holder)
    about = (
        f"run {holder.name} ({holder.id}, {_state_name(holder.state)}, as_of "
        f"{held_as_of.isoformat()}) holds the job's slot"
    )
    if covers(holder, as_of=as_of, asked_at=asked_at):
        print(f"{name}: {lost}{about} and covers this trigger: following it", file=waiting.out)
        final = _wait_final(waiting, holder.id)
        return TIMED_OUT if final is None else _report(waiting, final)
    wanted = (as_of or asked_at).isoformat()
    print(
        f"{name}: {lost}{about}; it does not cover as_of {wanted}: queueing behind it",
        file=waiting.out,
    )
    if _wait_final(waiting, holder.id, quiet=True) is None:
        return TIMED_OUT
    print(f"{name}: run {holder.name} has ended; creating the run again", file=waiting.out)
    return None


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


def _wait_final(waiting: _Waiting, run_id: UUID, *, quiet: bool = False) -> Any:
    """The run once final, printing each state change (None: the deadline passed first)."""
    shown = None
    while True:
        run = waiting.client.read_flow_run(run_id)
        state = run.state
        elapsed = time.monotonic() - waiting.started
        if state is not None and state.name != shown and not quiet:
            shown = state.name
            print(f"  {elapsed:6.1f}s  {state.name}", file=waiting.out)
        if state is not None and state.is_final():
            return run
        now = time.monotonic()
        if waiting.deadline is not None and now >= waiting.deadline:
            print(
                f"{waiting.name}: run {run.name} still {_state_name(state)} after "
                f"{waiting.deadline - waiting.started:g} s; the run goes on "
                f"(prefect flow-run inspect {run_id})",
                file=waiting.err,
            )
            return None
        pause = waiting.poll_seconds
        if waiting.deadline is not None:
            pause = min(pause, waiting.deadline - now)
        time.sleep(pause)


def _report(waiting: _Waiting, run: Any) -> int:
    """The run's counts and outcome; exit status 0 when it completed."""
    client, name, state = waiting.client, waiting.name, run.state
    rows = result_table(client, run.id, f"{name}-result")
    for row in rows:
        print(f"  {row['count']:<28} {row['value']}", file=waiting.out)
    if state.is_completed():
        # "completed with problems" and its counts when the run left work undone.
        said = f": {state.message}" if state.name != "Completed" and state.message else ""
        print(f"{name}: {state.name.lower()} (run {run.name}){said}", file=waiting.out)
        return 0
    print(f"{name}: run {run.name} ended {state.name}: {state.message}", file=waiting.err)
    failed = {row["value"] for row in rows if row["count"] == "failed_parts"}
    parts = ", ".join(sorted(failed - {"none"})) or "none reported"
    print(f"  failed parts: {parts}", file=waiting.err)
    for task_name, message in failed_tasks(client, run.id):
        print(f"  {task_name}: {message}", file=waiting.err)
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
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    # Only the failed ones: the API returns one page (200) of a run's task runs.
    task_runs = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED]))
        ),
    )
    return [
        (t.name.rsplit("-", 1)[0], t.state.message or t.state.name)
        for t in task_runs
        if t.state is not None and t.state.is_failed()
    ]


def _state_name(state: Any) -> str:
    return str(state.name) if state is not None else "unknown"
