"""Job alerts: which failure, silence or recovery becomes an alert, per job (pure rules).

One job, one incident. A job's first Failed, Crashed or TimedOut run opens its incident and
alerts at once (kind ``failed``). Further failures are counted; the job alerts again
(``still failing``, with the failures since the previous alert) at most every
``BACKJOBS_ALERT_REPEAT_MINUTES`` — at the next failure, or, when none comes, as soon as
the repeat time is up (:meth:`IncidentBook.due`), so every failure is reported by some
alert. The job's next completed run closes the incident with one ``recovered`` notice,
which also counts failures not reported yet. A scheduled job with no completed run for its
silent window alerts once (``silent``) unless it is already failing (its failures say more);
its next completed run sends ``recovered``.

The book is pure: the receiver (:mod:`backjobs.orchestration.alert_receiver`) loads a job's
incident from the server (:mod:`backjobs.orchestration.alert_store`, a Prefect Variable),
applies one signal and writes it back, so an incident outlives the dashboard's process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple


class AlertKind(StrEnum):
    FAILED = "failed"
    STILL_FAILING = "still failing"
    RECOVERED = "recovered"
    SILENT = "silent"


class RunInfo(NamedTuple):
    """What an alert says about a flow run."""

    flow_run_id: str
    name: str
    state: str  # the state's name: Failed, Crashed, TimedOut, Completed, …
    message: str
    failed_parts: tuple[str, ...] = ()  # "task-name: reason"


class Alert(NamedTuple):
    job: str
    kind: AlertKind
    run: RunInfo | None
    at: datetime
    first_failure_at: datetime | None  # the incident's first failure (None: silent only)
    failures: int  # failures in the incident so far
    new_failures: int  # failures this alert reports (not reported by an earlier alert)
    opened_at: datetime | None = None  # when the incident opened (with the counts: a key)


@dataclass
class Incident:
    opened_at: datetime
    first_failure_at: datetime | None = None
    failures: int = 0
    reported: int = 0  # failures counted by alerts already sent
    last_alert_at: datetime | None = None
    last_run: RunInfo | None = None
    silent: bool = False
    seen: list[str] = field(default_factory=list)  # run attempts / events counted


class IncidentBook:
    """Open incidents per job; each method returns the alert to send, if any."""

    def __init__(self, *, repeat: timedelta) -> None:
        self.repeat = repeat
        self.incidents: dict[str, Incident] = {}

    def failure(self, job: str, run: RunInfo, *, now: datetime) -> Alert | None:
        incident = self.incidents.get(job)
        if incident is None or incident.failures == 0:  # new, or silent until now
            incident = Incident(opened_at=now, first_failure_at=now, silent=False)
            self.incidents[job] = incident
            incident.failures = 1
            incident.last_run = run
            return self._alert(job, incident, AlertKind.FAILED, now=now)
        incident.failures += 1
        incident.last_run = run
        if self._repeat_due(incident, now):
            return self._alert(job, incident, AlertKind.STILL_FAILING, now=now)
        return None

    def completed(self, job: str, run: RunInfo, *, now: datetime) -> Alert | None:
        incident = self.incidents.pop(job, None)
        if incident is None:
            return None
        incident.last_run = run
        return self._alert(job, incident, AlertKind.RECOVERED, now=now)

    def silent(self, job: str, *, now: datetime) -> Alert | None:
        incident = self.incidents.get(job)
        if incident is not None:  # failing (it alerts as such) or already said silent
            return None
        incident = Incident(opened_at=now, silent=True)
        self.incidents[job] = incident
        return self._alert(job, incident, AlertKind.SILENT, now=now)

    def due(self, *, now: datetime) -> list[Alert]:
        """``still failing`` alerts whose repeat time is up with failures not yet reported."""
        return [
            self._alert(job, incident, AlertKind.STILL_FAILING, now=now)
            for job, incident in sorted(self.incidents.items())
            if incident.failures > incident.reported and self._repeat_due(incident, now)
        ]

    def _repeat_due(self, incident: Incident, now: datetime) -> bool:
        last = incident.last_alert_at
        return last is None or now - last >= self.repeat

    def _alert(self, job: str, incident: Incident, kind: AlertKind, *, now: datetime) -> Alert:
        new = incident.failures - incident.reported
        incident.reported = incident.failures
        incident.last_alert_at = now
        return Alert(
            job=job,
            kind=kind,
            run=incident.last_run if kind is not AlertKind.SILENT else None,
            at=now,
            first_failure_at=incident.first_failure_at,
            failures=incident.failures,
            new_failures=new,
            opened_at=incident.opened_at,
        )


def silent_window(
    *, period: timedelta, periods: int, floor: timedelta = timedelta(minutes=10)
) -> timedelta:
    """How long a scheduled job may go without a completed run: ``periods`` schedule
    periods, never less than ``floor``."""
    return max(period * periods, floor)


def run_url(public_url: str, flow_run_id: str) -> str:
    return f"{public_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


def deployment_url(public_url: str, deployment_id: str) -> str:
    return f"{public_url.rstrip('/')}/deployments/deployment/{deployment_id}"
