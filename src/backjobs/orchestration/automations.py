"""The server-side automations of backjobs, declared here and kept in step by ``backjobs deploy``.

For each deployment of prefect.yaml (``<job>`` = its name):

- ``backjobs-<job>-alert`` — reactive: a run of the deployment reached Failed, Crashed,
  TimedOut or Completed (also a Completed-type state named ``Completed …``); it
  calls the alert receiver (:mod:`backjobs.orchestration.alert_receiver`), which decides
  between ``failed``, ``still failing``, ``recovered`` and silence (one incident per job);
- ``backjobs-<job>-silent`` — proactive, only for a job with an active schedule: no
  Completed run within ``BACKJOBS_ALERT_SILENT_AFTER_PERIODS`` schedule periods (the
  longest gap between two fire times), never less than ``BACKJOBS_ALERT_SILENT_MIN_MINUTES``
  (10; lower only with ``BACKJOBS_ALERT_ALLOW_SHORT_SILENCE=true``, on a test rig);
- ``backjobs-<job>-zombie`` — Prefect's "detect zombie flows" pattern: after a run's
  heartbeat, expect another heartbeat or a final state within 3 heartbeat intervals
  (30 s on the backjobs pool: detection about 90-95 s after the last heartbeat); the
  receiver then sets the run Crashed if it is still Running (Cancelled if it is being
  cancelled: :mod:`backjobs.orchestration.alert_zombie`). The interval is the one the
  deployment's runs will use (:func:`deployment_heartbeat`): too short a window would
  crash healthy runs. The same window also opens when a run goes **Pending** (its worker
  took it) or **Running**: a run's heartbeats only begin once its process runs the flow,
  so a worker that died between taking a run and starting its process left the run Pending
  for good, holding the job's one slot (every later run Cancelled, "Deployment concurrency
  limit reached", and no failure to alert). A run starts seconds after its worker takes it
  (Prefect's Kubernetes worker itself crashes a run whose pod has not started in 60 s);
  one still Pending when the window ends is set Crashed too.

Every automation calls the receiver through one Webhook block, ``backjobs-alert-receiver``:
the dashboard's address as this process reaches it (PREFECT_API_URL without ``/api``, or
``BACKJOBS_ALERT_RECEIVER_URL``) with the machine credential (PREFECT_API_AUTH_STRING) as
basic auth. The sync owns the automations whose name starts with ``backjobs-``: it creates
the missing ones, replaces changed ones (a fingerprint in the description tells), and
deletes those no deployment of the file needs; other automations are never touched.

Prefect does not keep automation names unique, so two deploys at once (two operators, two
CI pipelines) both found a name missing and both created it. The copy was never seen again:
the sync read one automation per name, so every later deploy said "unchanged" over two, and
the copy kept firing with what it was made from (a job's old silent window; a deleted job's
alert). The sync now keeps **one automation per name**: of several copies it keeps the one
of the lowest id that matches and deletes the others, and after its own creations it reads
the names again and deletes every copy but the one of the lowest id. Whichever deploy
looks last sees every copy made and keeps the same one, and the copy of the lowest id is
never deleted by that step, so two deploys at once end with one automation each, whichever
order their calls land in (tried: 20 rounds of two deploys at once on the stack, half of
them with different silent windows). The report names each copy it deleted, and only those
it deleted (one already gone is not counted), so the two reports add up.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from backjobs.orchestration.alert_receiver import RECEIVER_PATH, Signal
from backjobs.orchestration.alert_redelivery import PREFIX
from backjobs.orchestration.alerts import silent_window
from backjobs.orchestration.crons import fire_times

BLOCK_NAME = "backjobs-alert-receiver"
HEARTBEAT_SETTING = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MIN_HEARTBEAT_SECONDS = 30  # Prefect refuses a shorter interval
ZOMBIE_HEARTBEATS = 3  # a zombie trigger's window must be >= 2 heartbeat intervals
# Prefect reads "*" as one character or more: "Completed*" alone misses plain Completed.
COMPLETED = ("Completed", "Completed*")
ENDED = (*COMPLETED, "Failed", "Crashed", "TimedOut", "Cancelled")


class JobSchedule(NamedTuple):
    cron: str
    timezone: str
    day_or: bool
    active: bool


@dataclass(frozen=True)
class AutomationChanges:
    created: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: int = 0
    copies: tuple[str, ...] = ()  # a name once per extra copy deleted


class Heartbeat(NamedTuple):
    """How often a deployment's runs send heartbeats, and where ``deploy`` learnt it."""

    seconds: int
    source: str  # for deploy's report, e.g. "from the job template of pool 'backjobs'"
    problem: str | None = None  # a setting the runs will refuse: deploy reports it

    def report(self) -> str:
        """What the zombie window assumes, as deploy's report says it."""
        return (
            f"a Running run is Crashed {zombie_window(self.seconds)} s after its last"
            " heartbeat, a Pending one as long after its worker took it;"
            f" heartbeats every {self.seconds} s, {self.source}"
        )


def zombie_window(heartbeat_seconds: int) -> int:
    """How long a zombie trigger waits after a run's heartbeat for the next one or its end."""
    return heartbeat_seconds * ZOMBIE_HEARTBEATS


def run_heartbeat(
    run_env: Mapping[str, str | None],
    *,
    pool: str | None,
    deploying: str | None,
    prefect_default: int,
) -> Heartbeat:
    """The heartbeat interval of runs started with ``run_env`` (the environment the pool's
    job template and the deployment's job variables give them).

    A run takes PREFECT_FLOWS_HEARTBEAT_FREQUENCY from that environment, else from its
    worker's. The worker's is unknown here: the deploying shell's setting stands for it
    when set (whoever deploys says what the workers use), else Prefect's own default (180
    s in Prefect 3.9). A window sized for a shorter interval than the runs use would crash
    every run that lasts longer than it, so when in doubt the longer one is taken.
    """
    where = f"pool {pool!r}" if pool else "a deployment with no work pool"
    fixed = run_env.get(HEARTBEAT_SETTING)
    if fixed is not None:
        seconds = _whole_seconds(fixed)
        if seconds is None:
            return Heartbeat(
                prefect_default,
                f"Prefect's default, as {where} sets an invalid {HEARTBEAT_SETTING}",
                problem=(
                    f"{where} sets {HEARTBEAT_SETTING}={fixed!r}: Prefect takes a whole "
                    f"number of seconds, at least {MIN_HEARTBEAT_SECONDS}; its runs will "
                    "fail to start"
                ),
            )
        return Heartbeat(seconds, f"from the job template of {where}")
    leaves = f"{where} leaves {HEARTBEAT_SETTING} to the workers"
    if deploying is not None and (seconds := _whole_seconds(deploying)) is not None:
        return Heartbeat(seconds, f"this shell's {HEARTBEAT_SETTING} ({leaves})")
    return Heartbeat(prefect_default, f"Prefect's default ({leaves})")


def _whole_seconds(value: str | None) -> int | None:
    text = (value or "").strip()
    if not text.isdigit() or int(text) < MIN_HEARTBEAT_SECONDS:
        return None
    return int(text)


async def deployment_heartbeat(client: Any, deployment: Any) -> Heartbeat:
    """The heartbeat interval of ``deployment``'s runs, from its pool's job template and
    its job variables as the server holds them (Prefect's own merge of the two)."""
    from prefect.exceptions import ObjectNotFound
    from prefect.settings.models.flows import FlowsSettings
    from prefect.workers.base import BaseJobConfiguration

    default = FlowsSettings.model_fields["heartbeat_frequency"].default
    pool_name = deployment.work_pool_name
    run_env: Mapping[str, str | None] = {}
    if pool_name:
        try:
            pool = await client.read_work_pool(pool_name)
        except ObjectNotFound:
            pool = None
        if pool is not None and pool.base_job_template:
            configuration: BaseJobConfiguration
            try:
                configuration = await BaseJobConfiguration.from_template_and_values(
                    pool.base_job_template, dict(deployment.job_variables or {}), client=client
                )
            except Exception as exc:  # the worker will meet it too; the window stays safe
                return Heartbeat(
                    int(default),
                    f"Prefect's default, as the job template of pool {pool_name!r} cannot be"
                    " filled in",
                    problem=f"the job template of pool {pool_name!r} cannot be filled in: {exc}",
                )
            run_env = configuration.env
    return run_heartbeat(
        run_env,
        pool=pool_name,
        deploying=os.environ.get(HEARTBEAT_SETTING),
        prefect_default=int(default),
    )


def cron_period(schedule: JobSchedule, *, now: datetime, samples: int = 30) -> timedelta:
    """The longest gap between two of the next ``samples`` fire times of a cron."""
    times = fire_times(schedule, now, samples)
    return max(later - earlier for earlier, later in itertools.pairwise(times))


def job_silent_window(
    schedules: Sequence[JobSchedule], *, periods: int, floor: timedelta, now: datetime
) -> timedelta | None:
    """The job's silent window, or None when no active schedule makes it run on its own."""
    active = [s for s in schedules if s.active]
    if not active:
        return None
    period = min(cron_period(s, now=now) for s in active)
    return silent_window(period=period, periods=periods, floor=floor)


def _trigger(
    deployment_id: str, *, expect: Sequence[str], posture: str, within: float, **more: Any
) -> dict[str, Any]:
    return {
        "type": "event",
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": {
            "prefect.resource.role": "deployment",
            "prefect.resource.id": f"prefect.deployment.{deployment_id}",
        },
        "expect": [f"prefect.flow-run.{name}" for name in expect],
        "posture": posture,
        "threshold": 1,
        "within": within,
        **more,
    }


def _call(block_id: str, payload: Mapping[str, str]) -> list[dict[str, Any]]:
    # Values are JSON strings with Jinja placeholders; only ids, names and times go in.
    body = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in payload.items()) + "}"
    return [{"type": "call-webhook", "block_document_id": block_id, "payload": body}]


RUN_ID = "\"{{ event.resource.id | replace('prefect.flow-run.', '') }}\""


def wanted_automations(
    job: str,
    deployment_id: str,
    *,
    block_id: str,
    silent_after: timedelta | None,
    heartbeat_seconds: int,
) -> list[dict[str, Any]]:
    """The automations one deployment needs (see the module docstring)."""
    common = {"job": json.dumps(job), "deployment_id": json.dumps(deployment_id)}
    state_call = {
        "signal": json.dumps(Signal.STATE),
        **common,
        "flow_run_id": RUN_ID,
        "event_id": '"{{ event.id }}"',
        "event": '"{{ event.event }}"',
    }
    zombie_call = {
        "signal": json.dumps(Signal.ZOMBIE),
        **common,
        "flow_run_id": RUN_ID,
        "last_heartbeat": '"{{ event.occurred }}"',
        "last_event": '"{{ event.event }}"',
        "heartbeat_seconds": str(heartbeat_seconds),
    }
    alert_trigger = _trigger(
        deployment_id,
        expect=[*COMPLETED, "Failed", "Crashed", "TimedOut"],
        posture="Reactive",
        within=0,
        for_each=["prefect.resource.id"],
    )
    zombie_trigger = _trigger(
        deployment_id,
        expect=["heartbeat", "Running", *ENDED],
        after=[f"prefect.flow-run.{name}" for name in ("heartbeat", "Pending", "Running")],
        posture="Proactive",
        within=zombie_window(heartbeat_seconds),
        for_each=["prefect.resource.id"],
    )
    found = [
        _automation(
            f"{PREFIX}{job}-alert",
            f"Alerts when a run of {job} fails, and when it recovers.",
            alert_trigger,
            _call(block_id, state_call),
        ),
        _automation(
            f"{PREFIX}{job}-zombie",
            f"Marks a run of {job} Crashed when its heartbeats stop.",
            zombie_trigger,
            _call(block_id, zombie_call),
        ),
    ]
    if silent_after is not None:
        silent_trigger = _trigger(
            deployment_id,
            expect=list(COMPLETED),
            posture="Proactive",
            within=silent_after.total_seconds(),
        )
        found.append(
            _automation(
                f"{PREFIX}{job}-silent",
                f"Alerts when {job} has no completed run for {silent_after}.",
                silent_trigger,
                _call(block_id, {"signal": json.dumps(Signal.SILENT), **common}),
            )
        )
    return found


def _automation(
    name: str, description: str, trigger: dict[str, Any], actions: list[dict[str, Any]]
) -> dict[str, Any]:
    spec = {"name": name, "trigger": trigger, "actions": actions, "enabled": True}
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec | {"description": f"{description} Managed by backjobs deploy ({fingerprint})."}


def receiver_url(api_url: str, *, override: str | None = None) -> str:
    if override:
        return override
    base = api_url.rstrip("/")
    return base.removesuffix("/api") + RECEIVER_PATH


async def ensure_receiver_block(client: Any, *, url: str, auth_string: str | None) -> str:
    """The Webhook block the automations call; its id."""
    from prefect.blocks.webhook import Webhook
    from pydantic import SecretStr

    headers = {}
    if auth_string:
        headers["Authorization"] = "Basic " + base64.b64encode(auth_string.encode()).decode()
    block = Webhook(method="POST", url=SecretStr(url), headers=headers)
    block_id = await block.save(BLOCK_NAME, overwrite=True, client=client)
    return str(block_id)


async def _all_automations(client: Any) -> list[Any]:
    """Every automation on the server, once each. The API returns a page at a time (200 by
    default, sorted by name), and ops' own automations named before ``backjobs-`` would push
    backjobs' off the first one: unseen, they were created again at every deploy. Pages are
    not a snapshot: an automation created meanwhile (a deploy beside this one) shifts the
    next page, so one seen on a page comes again on the next; counted twice, it was taken
    for its own copy and deleted, and with it the last automation of its name."""
    found: list[Any] = []
    while page := await client.read_automations(offset=len(found)):
        found += page
    return list({automation.id: automation for automation in found}.values())


async def _backjobs_automations(client: Any) -> dict[str, list[Any]]:
    """The server's ``backjobs-*`` automations by name, each name's copies lowest id first
    (random UUIDs: an arbitrary order, but the same for every reader)."""
    found: dict[str, list[Any]] = {}
    for automation in sorted(await _all_automations(client), key=lambda a: str(a.id)):
        if automation.name.startswith(PREFIX):
            found.setdefault(automation.name, []).append(automation)
    return found


async def _delete_automations(client: Any, automations: Sequence[Any]) -> int:
    """Delete ``automations``; how many this call deleted. One already gone (a deploy beside
    this one deleted it first) is not counted, so two reports add up to what was deleted."""
    from prefect.exceptions import PrefectHTTPStatusError

    deleted = 0
    for automation in automations:
        try:
            await client.delete_automation(automation.id)
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
        else:
            deleted += 1
    return deleted


async def sync_automations(client: Any, wanted: Sequence[dict[str, Any]]) -> AutomationChanges:
    """Make the server's ``backjobs-*`` automations exactly ``wanted``, one of each name."""
    from prefect.events.schemas.automations import AutomationCore

    existing = await _backjobs_automations(client)
    created: list[str] = []
    replaced: list[str] = []
    deleted: list[str] = []
    copies: list[str] = []
    unchanged = 0
    for spec in wanted:
        name = spec["name"]
        found = existing.pop(name, [])
        same = [a for a in found if a.description == spec["description"] and a.enabled]
        if same:
            unchanged += 1
            copies += [name] * await _delete_automations(
                client, [a for a in found if a is not same[0]]
            )
            continue
        gone = await _delete_automations(client, found)
        (replaced if gone else created).append(name)
        copies += [name] * max(gone - 1, 0)
        await client.create_automation(AutomationCore.model_validate(spec))
    for name, leftovers in sorted(existing.items()):
        gone = await _delete_automations(client, leftovers)
        deleted += [name] if gone else []
        copies += [name] * max(gone - 1, 0)
    # A deploy beside this one may have created a name this one created too. Only a deploy
    # that created reads again: every copy is made by one, after its own creations, so the
    # last of their second readings sees them all (an unchanged deploy skips a listing).
    if created or replaced:
        for name, found in (await _backjobs_automations(client)).items():
            copies += [name] * await _delete_automations(client, found[1:])
    return AutomationChanges(
        created=tuple(created),
        replaced=tuple(replaced),
        deleted=tuple(deleted),
        unchanged=unchanged,
        copies=tuple(sorted(copies)),
    )


async def sync_job_automations(
    client: Any,
    deployments: Mapping[str, tuple[str, Sequence[JobSchedule]]],
    *,
    heartbeats: Mapping[str, Heartbeat],
    api_url: str,
    auth_string: str | None,
) -> AutomationChanges:
    """The receiver block, then every deployment's automations (``name -> (id, schedules)``;
    ``heartbeats``: each one's :func:`deployment_heartbeat`).

    Settings read here (this process, the deploying one): BACKJOBS_ALERT_SILENT_AFTER_PERIODS,
    BACKJOBS_ALERT_SILENT_MIN_MINUTES and BACKJOBS_ALERT_RECEIVER_URL.
    """
    from backjobs.settings import get_settings

    settings = get_settings()
    url = receiver_url(api_url, override=settings.alert_receiver_url)
    block_id = await ensure_receiver_block(client, url=url, auth_string=auth_string)
    now = datetime.now(UTC)
    wanted = []
    for job, (deployment_id, schedules) in sorted(deployments.items()):
        window = job_silent_window(
            schedules,
            periods=settings.alert_silent_after_periods,
            floor=timedelta(minutes=settings.alert_silent_min_minutes),
            now=now,
        )
        wanted += wanted_automations(
            job,
            deployment_id,
            block_id=block_id,
            silent_after=window,
            heartbeat_seconds=heartbeats[job].seconds,
        )
    return await sync_automations(client, wanted)
