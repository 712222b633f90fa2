"""Where the open incidents live: one Prefect Variable per job, on the server.

A job with an open incident (failing, or silent) has the Variable
``backjobs-incident-<job>``, whose value is the incident as JSON (:func:`incident_record`):
when it opened, its first failure, the failures counted and those already reported, when
it last alerted, the last run, and what it last counted — a failed run attempt as
``<flow run id>#<run_count>``, another event by its id — so a failure or an event that comes
twice is counted once, across restarts too. Recovery deletes it.

Why a Variable: the incidents then live where the events and the automations live, in the
Prefect server's database, and survive a restart of ``backjobs dashboard`` (the receiver
holds one in memory only while the server cannot take its write: see
:meth:`backjobs.orchestration.alert_receiver.AlertReceiver._store`) — a job still failing
after a restart goes on as the same incident, and its recovery still sends ``recovered``
with the count. It needs no table in the app's database, and ops can see an open incident
on the UI's Variables page; deleting the Variable closes the incident without a notice (the
next failure alerts as a first failure). The receiver reads and writes them through
Prefect's app in process, under its lock: run one ``backjobs dashboard`` per server (two
would race on an incident).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

import httpx

from backjobs.orchestration.alerts import Incident, RunInfo

PREFIX = "backjobs-incident-"
TAG = "backjobs-incident"
SEEN_PER_JOB = 20  # counted attempts or events kept per incident
MESSAGE_CHARS = 1000  # a Variable holds at most 5,000 characters of JSON
PARTS, PART_CHARS = 10, 200


def variable_name(job: str) -> str:
    """``backjobs-incident-<job>``; a job name Prefect refuses in a Variable name
    (anything but lowercase letters, digits, ``-`` and ``_``) is cleaned and hashed."""
    clean = re.sub(r"[^a-z0-9_-]", "_", job.lower())[:200]
    if clean != job:
        clean += "-" + hashlib.sha256(job.encode()).hexdigest()[:8]
    return PREFIX + clean


def incident_record(job: str, incident: Incident) -> dict[str, Any]:
    run = incident.last_run
    return {
        "job": job,
        "opened_at": incident.opened_at.isoformat(),
        "first_failure_at": _iso(incident.first_failure_at),
        "failures": incident.failures,
        "reported": incident.reported,
        "last_alert_at": _iso(incident.last_alert_at),
        "silent": incident.silent,
        "last_run": None
        if run is None
        else {
            "flow_run_id": run.flow_run_id,
            "name": run.name,
            "state": run.state,
            "message": run.message[:MESSAGE_CHARS],
            "failed_parts": [part[:PART_CHARS] for part in run.failed_parts[:PARTS]],
        },
        "seen": incident.seen[-SEEN_PER_JOB:],
    }


def incident_from_record(record: dict[str, Any]) -> tuple[str, Incident]:
    run = record.get("last_run")
    return str(record["job"]), Incident(
        opened_at=datetime.fromisoformat(record["opened_at"]),
        first_failure_at=_time(record.get("first_failure_at")),
        failures=int(record.get("failures", 0)),
        reported=int(record.get("reported", 0)),
        last_alert_at=_time(record.get("last_alert_at")),
        last_run=None
        if not run
        else RunInfo(
            flow_run_id=str(run["flow_run_id"]),
            name=str(run["name"]),
            state=str(run["state"]),
            message=str(run.get("message") or ""),
            failed_parts=tuple(str(p) for p in run.get("failed_parts") or ()),
        ),
        silent=bool(record.get("silent")),
        seen=[str(s) for s in record.get("seen") or ()],
    )


async def load_incident(api: httpx.AsyncClient, job: str) -> Incident | None:
    response = await api.get(f"/variables/name/{variable_name(job)}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return incident_from_record(response.json()["value"])[1]


async def load_incidents(api: httpx.AsyncClient) -> dict[str, Incident]:
    response = await api.post(
        "/variables/filter", json={"variables": {"tags": {"all_": [TAG]}}, "limit": 200}
    )
    response.raise_for_status()
    found = (incident_from_record(v["value"]) for v in response.json())
    return dict(found)


async def save_incident(api: httpx.AsyncClient, job: str, incident: Incident | None) -> None:
    """Write the job's incident, or delete it (None: no incident open)."""
    name = variable_name(job)
    if incident is None:
        response = await api.delete(f"/variables/name/{name}")
        if response.status_code != 404:
            response.raise_for_status()
        return
    value = incident_record(job, incident)
    response = await api.patch(f"/variables/name/{name}", json={"value": value})
    if response.status_code == 404:
        response = await api.post("/variables/", json={"name": name, "value": value, "tags": [TAG]})
    response.raise_for_status()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
