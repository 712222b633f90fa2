"""``backjobs deploy``: deploy prefect.yaml so the server holds exactly its schedules.

``prefect deploy`` upserts: a schedule dropped from the file, a deleted ``schedules:`` key
or ``schedules: []`` leave the old schedule running on the server, and removing an
``active: false`` line leaves it off. So, after checking the file (a cron that can never
fire is refused) and running ``prefect --no-prompt deploy --all``, every deployment's
schedules are made equal to the file's: matched by slug (else by cron and timezone),
changed ones updated in place (same id), missing ones created, the rest deleted. A
schedule without ``active:`` is active. A deployment without schedules never runs on its
own (the seed's CronNever) but can be triggered. A backjobs deployment (its pull step is
:data:`PULL_STEP`) the file no longer lists loses its schedules and its silence automation,
and stays on the server with its runs, alerted when run by hand; deployments of other
projects are left alone (:func:`_retire`).

Then the runs of schedules now gone or paused that Prefect leaves behind (its scheduler
inserting them as the schedule is deleted; runs queued for a concurrency slot) are deleted
(:mod:`backjobs.orchestration.orphan_runs`), one line per deployment that had any.

What it prints is the server's truth: the schedules of every deployment are read before
the whole deploy and after it, and each difference is one line
(:mod:`backjobs.orchestration.schedule_report`), with the automations' changes after.

Deployments are named after their flow (``cleanup-job/cleanup-job``), as ``backjobs
trigger`` expects.

The pull step (:func:`set_project_directory`) runs on the worker before each flow run:
it moves into the folder holding prefect.yaml, found through ``BACKJOBS_PROJECT_DIR`` in
the worker's environment (or the pool's job variables), else the worker's own working
directory when that holds prefect.yaml. Nothing of the deploying machine's paths is
stored in the deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backjobs.orchestration.orphan_runs import ORPHANED_BY, PAGE, delete_orphaned_runs
from backjobs.orchestration.prefect_yaml import check_project_file, load_deployments
from backjobs.orchestration.schedule_report import (
    describe_changes,
    describe_retired,
    read_schedules,
    server_schedules,
)

if TYPE_CHECKING:
    from backjobs.orchestration.automations import Heartbeat

PROJECT_DIR_ENV = "BACKJOBS_PROJECT_DIR"
PROJECT_FILE = "prefect.yaml"
# The pull step of every backjobs deployment (prefect.yaml's `pull:`): it tells the
# project's deployments on a server from any other's.
PULL_STEP = f"{__name__}.set_project_directory"


class DeployError(RuntimeError):
    """Why deploying stopped, in lines an operator can act on."""


@dataclass(frozen=True)
class WantedSchedule:
    """One entry of a deployment's ``schedules:`` in prefect.yaml."""

    cron: str
    timezone: str = "UTC"
    day_or: bool = True
    active: bool = True
    slug: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, entry: Mapping[str, Any]) -> WantedSchedule:
        return cls(
            cron=str(entry["cron"]),
            timezone=str(entry.get("timezone") or "UTC"),
            day_or=bool(entry.get("day_or", True)),
            active=bool(entry.get("active", True)),
            slug=entry.get("slug"),
            parameters=dict(entry.get("parameters") or {}),
        )


@dataclass
class ScheduleChanges:
    """What :func:`sync_schedules` did to one deployment, and (``report``) every change of
    its schedules on the server from before the deploy to after it, one line each."""

    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    orphans: int = 0  # runs of removed, paused or changed schedules deleted (orphan_runs)
    report: list[str] = field(default_factory=list)  # set by _retire for a retired one
    automations: list[str] = field(default_factory=list)


def deploy(
    project_file: Path, *, env: Mapping[str, str] | None = None
) -> dict[str, ScheduleChanges]:
    """Check, ``prefect deploy --all``, then make the server's schedules the file's.

    ``env`` is added to this process's environment for the ``prefect`` command; the
    schedule sync uses the Prefect settings of this process (PREFECT_API_URL, …) unless
    ``env`` names them.
    """
    project_file = Path(project_file).resolve()
    problems = check_project_file(project_file)
    if problems:
        raise DeployError(
            "refusing to deploy: " + "; ".join(f"{project_file.name}: {p}" for p in problems)
        )
    names = [str(d["name"]) for d in load_deployments(project_file)]
    before = asyncio.run(_with_client(read_schedules, names, env=env or {}))
    run_prefect_deploy(project_file, env=env)
    wanted = {
        str(d["name"]): [WantedSchedule.from_yaml(s) for s in (d.get("schedules") or [])]
        for d in load_deployments(project_file)
    }
    changes: dict[str, ScheduleChanges] = asyncio.run(
        _with_client(_sync_all, wanted, env=env or {})
    )
    after = asyncio.run(_with_client(read_schedules, names, env=env or {}))
    for name, change in changes.items():
        orphans = (
            [f"{name}: {change.orphans} scheduled run(s) of {ORPHANED_BY} deleted"]
            if change.orphans
            else []
        )
        described = (
            describe_changes(name, before.get(name), after.get(name) or [])
            if name in wanted
            else change.report  # a job the file no longer lists (_retire)
        )
        change.report = [*described, *orphans, *change.automations]
    return changes


def run_prefect_deploy(project_file: Path, *, env: Mapping[str, str] | None = None) -> None:
    """``prefect --no-prompt deploy --all --prefect-file FILE``, run by Prefect's own CLI
    in this process: from the folder holding the file, with this process's environment plus
    ``env``, Prefect's settings built anew from them as a ``prefect`` process would.

    In this process, not a ``prefect`` subprocess: a second Python importing Prefect cost
    each deploy ≈ 1.5 s of CPU and a second of waiting. Prefect's logging is left as it
    is (its CLI would configure this process's for good). What Prefect prints is kept, and
    its last lines are the error when the deploy fails.
    """
    from prefect.cli._app import _run_cli
    from prefect.context import root_settings_context

    args = ["--no-prompt", "deploy", "--all", "--prefect-file", str(project_file)]
    output = io.StringIO()
    code: int | str | None
    with (
        _environment({"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}, dict(env or {})),
        contextlib.chdir(project_file.parent),
        _prefect_logging_untouched(),
        contextlib.redirect_stdout(output),
        contextlib.redirect_stderr(output),
    ):
        try:
            with root_settings_context():
                _run_cli(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        except Exception:  # Prefect's own failure: its traceback is the report
            output.write(traceback.format_exc())
            code = 1
    if code not in (0, None):
        tail = "\n".join(output.getvalue().strip().splitlines()[-15:])
        raise DeployError(f"prefect deploy --all failed (exit {code}):\n{tail}")


@contextlib.contextmanager
def _environment(defaults: Mapping[str, str], values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``defaults`` where unset; restored after."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ})
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _prefect_logging_untouched() -> Iterator[None]:
    """Prefect's CLI sets up logging for its process; here that would bind Prefect's
    handlers to the captured output for the rest of this process's life."""
    import prefect.logging.configuration as configuration

    setup = configuration.setup_logging
    configuration.setup_logging = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        configuration.setup_logging = setup


async def _with_client(work: Any, argument: Any, *, env: Mapping[str, str]) -> Any:
    """``await work(client, argument)`` with a client of the server ``env`` names (else
    this process's Prefect settings)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates: dict[Any, Any] = {}
    if env.get("PREFECT_API_URL"):
        updates[PREFECT_API_URL] = env["PREFECT_API_URL"]
    if env.get("PREFECT_API_AUTH_STRING"):
        updates[PREFECT_API_AUTH_STRING] = env["PREFECT_API_AUTH_STRING"]
    with temporary_settings(updates=updates):
        async with get_client() as client:
            return await work(client, argument)


async def _sync_all(
    client: Any, wanted: Mapping[str, list[WantedSchedule]]
) -> dict[str, ScheduleChanges]:
    from backjobs.orchestration.automations import deployment_heartbeat

    changes = {}
    ids = {}
    heartbeats = {}
    watched = dict(wanted)  # the jobs whose automations are kept, by their schedules
    found = [(await client.read_deployment_by_name(f"{name}/{name}"), name) for name in wanted]
    for deployment, name in found:
        changes[name] = await sync_schedules(client, deployment.id, wanted[name])
    for deployment, change in await _retire(client, listed=set(wanted)):
        # Still on the server and runnable by hand: watched as a job without a schedule
        # (alert and zombie automations, no silence).
        found.append((deployment, deployment.name))
        changes[deployment.name] = change
        watched[deployment.name] = []
    for deployment, name in found:
        ids[name] = str(deployment.id)
        heartbeats[name] = await deployment_heartbeat(client, deployment)
        if heartbeats[name].problem:
            changes[name].automations.append(f"{name}: warning: {heartbeats[name].problem}")
    done = await _sync_automations(client, ids, watched, heartbeats)
    _report_automations(done, changes, heartbeats)
    for name, deployment_id in ids.items():  # last: the scheduler's pass has had its time
        changes[name].orphans = await delete_orphaned_runs(client, deployment_id)
    return changes


def _report_automations(
    done: Any, changes: Mapping[str, ScheduleChanges], heartbeats: Mapping[str, Heartbeat]
) -> None:
    """Each automation created, replaced or deleted, on its job's lines."""
    for verb, names in (("created", done.created), ("replaced", done.replaced)):
        for automation in names:
            job = _job_of(automation, changes)
            line = f"{job}: automation {automation} {verb}"
            if automation.endswith("-zombie"):  # say what its window assumes
                line += f" ({heartbeats[job].report()})"
            changes[job].automations.append(line)
    for automation in done.deleted:  # of a job prefect.yaml no longer has, or a stale kind
        job = _job_of(automation, changes)
        if job in changes:
            changes[job].automations.append(f"{job}: automation {automation} deleted")
        else:
            print(f"automation {automation} deleted (no such job in prefect.yaml)")
    for automation, count in sorted(Counter(done.copies).items()):  # one of each name is kept
        line = (
            f"automation {automation}: {count} duplicate(s) deleted"
            " (made by a deploy beside this one, or by hand)"
        )
        job = _job_of(automation, changes)
        if job in changes:
            changes[job].automations.append(f"{job}: {line}")
        else:
            print(line)


async def _retire(client: Any, *, listed: set[str]) -> list[tuple[Any, ScheduleChanges]]:
    """Every backjobs deployment on the server (its pull step is :data:`PULL_STEP`) that
    prefect.yaml no longer lists loses its schedules, as a schedule removed from the file
    does: it never runs on its own again. The deployment itself, its past runs and its
    history in the UI stay, and the report says how to delete it; while it stays, a run of
    it started by hand is alerted as any job's (:func:`_sync_all`). Deployments of other
    projects on the same server are left alone."""
    retired: list[tuple[Any, ScheduleChanges]] = []
    offset = 0
    while True:
        page = await client.read_deployments(limit=PAGE, offset=offset)
        for deployment in page:
            if deployment.name in listed or not _is_backjobs(deployment):
                continue
            before = await server_schedules(client, deployment.id)
            change = await sync_schedules(client, deployment.id, [])
            flow = await client.read_flow(deployment.flow_id)
            change.report = describe_retired(
                deployment.name, f"{flow.name}/{deployment.name}", before
            )
            retired.append((deployment, change))
        if len(page) < PAGE:
            return retired
        offset += PAGE


def _is_backjobs(deployment: Any) -> bool:
    return any(PULL_STEP in step for step in deployment.pull_steps or [])


def _job_of(automation: str, jobs: Mapping[str, Any]) -> str:
    """The job an automation named ``backjobs-<job>-<kind>`` belongs to."""
    for job in sorted(jobs, key=len, reverse=True):
        if automation.startswith(f"backjobs-{job}-"):
            return job
    return automation


async def _sync_automations(
    client: Any,
    ids: Mapping[str, str],
    wanted: Mapping[str, list[WantedSchedule]],
    heartbeats: Mapping[str, Heartbeat],
) -> Any:
    """The alert and zombie automations (backjobs.orchestration.automations)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from backjobs.orchestration.automations import JobSchedule, sync_job_automations

    jobs = {
        name: (ids[name], [JobSchedule(w.cron, w.timezone, w.day_or, w.active) for w in found])
        for name, found in wanted.items()
    }
    auth = PREFECT_API_AUTH_STRING.value()
    done = await sync_job_automations(
        client,
        jobs,
        heartbeats=heartbeats,
        api_url=str(PREFECT_API_URL.value()),
        auth_string=auth.get_secret_value() if hasattr(auth, "get_secret_value") else auth,
    )
    return done


async def sync_schedules(
    client: Any, deployment_id: Any, wanted: list[WantedSchedule]
) -> ScheduleChanges:
    """Make the deployment's schedules exactly ``wanted`` (ids kept where they match)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    changes = ScheduleChanges()
    existing = list(await client.read_deployment_schedules(deployment_id))
    for want in wanted:
        match = _find_match(existing, want)
        schedule = CronSchedule(cron=want.cron, timezone=want.timezone, day_or=want.day_or)
        if match is None:
            create = DeploymentScheduleCreate(
                schedule=schedule, active=want.active, slug=want.slug, parameters=want.parameters
            )
            await client.create_deployment_schedules(deployment_id, [create])
            changes.created += 1
            continue
        existing.remove(match)
        if _same(match, want):
            changes.unchanged += 1
            continue
        await client.update_deployment_schedule(
            deployment_id,
            match.id,
            active=want.active,
            schedule=schedule,
            slug=want.slug,
            parameters=want.parameters,
        )
        changes.updated += 1
    for leftover in existing:
        await client.delete_deployment_schedule(deployment_id, leftover.id)
        changes.deleted += 1
    return changes


def _find_match(existing: list[Any], want: WantedSchedule) -> Any:
    if want.slug:
        for current in existing:
            if current.slug == want.slug:
                return current
    for current in existing:
        cron = getattr(current.schedule, "cron", None)
        zone = getattr(current.schedule, "timezone", None) or "UTC"
        if cron == want.cron and zone == want.timezone and (current.slug or None) == want.slug:
            return current
    return None


def _same(current: Any, want: WantedSchedule) -> bool:
    schedule = current.schedule
    return bool(
        getattr(schedule, "cron", None) == want.cron
        and (getattr(schedule, "timezone", None) or "UTC") == want.timezone
        and getattr(schedule, "day_or", True) == want.day_or
        and current.active == want.active
        and (current.slug or None) == want.slug
        and dict(current.parameters or {}) == want.parameters
    )


def set_project_directory() -> dict[str, str]:
    """The deployments' pull step: move into the project folder (the one with prefect.yaml).

    ``BACKJOBS_PROJECT_DIR`` (the worker's environment or the pool's job variables) names
    it; without it, the worker's working directory is used when it holds prefect.yaml (a
    worker started in the checkout needs nothing). The flow run's process is the worker's
    child, so the worker's directory is its parent's (Linux ``/proc``).
    """
    wanted = os.environ.get(PROJECT_DIR_ENV)
    if wanted:
        folder = Path(wanted).expanduser()
        if not (folder / PROJECT_FILE).is_file():
            raise FileNotFoundError(
                f"{PROJECT_DIR_ENV}={wanted}: no {PROJECT_FILE} there; point it at the "
                "backjobs checkout on this worker"
            )
    else:
        folder = _worker_directory()
    os.chdir(folder)
    return {"directory": str(folder)}


def _worker_directory() -> Path:
    try:
        parent = Path(os.readlink(f"/proc/{os.getppid()}/cwd"))
    except OSError:
        parent = None
    if parent is not None and (parent / PROJECT_FILE).is_file():
        return parent
    raise FileNotFoundError(
        f"set {PROJECT_DIR_ENV} in the worker's environment (or the work pool's job "
        f"variables) to the folder holding the backjobs {PROJECT_FILE}"
    )
