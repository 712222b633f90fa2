"""Automation calls that did not reach the receiver, found in the server's event log and
delivered again, so that every failure, silence and dead heartbeat is accounted for.

Prefect never retries a webhook action, and records a call that went wrong in two ways:
``prefect.automation.action.failed`` when the call itself failed (a connection refused or
cut, a timeout), and ``prefect.automation.action.executed`` with the answer's
``status_code`` when the receiver answered with an error — Prefect counts any answer as
done. A 401 (the webhook block holds a machine credential the dashboard no longer takes:
it was changed without ``backjobs deploy``) or a 503 (the receiver could not read or store
the incident) would each lose the call's alert, or leave a dead run Running.

The receiver (:mod:`backjobs.orchestration.alert_receiver`) reads these events of the
``backjobs-*`` automations at every pass of its flusher, rebuilds each call from the
automation (job, kind, deployment) and its triggering event (run, event id, time) — the
body the automation would have sent — and handles it as if it had arrived. A call handled
twice is answered ``duplicate`` (event ids and run attempts are remembered); a ``silent``
call is ``stale`` once a run of its job has completed after it (:func:`completed_since`).
Where the log was read up to is kept on the server (a Prefect Variable), so a restart
neither skips nor repeats a call. While the server cannot take that write (its SQLite file
locked by a busy server), the receiver keeps the mark in memory in its place and writes it
again at the next pass; only a restart in between reads those calls again (a failure already
counted is then answered ``duplicate``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

logger = logging.getLogger(__name__)

PREFIX = "backjobs-"  # every automation deploy manages: backjobs-<job>-<kind>
SIGNAL_OF_KIND = {"alert": "state", "zombie": "zombie", "silent": "silent"}
WATERMARK = "backjobs-alert-redelivery"  # the Variable: where the log was read up to
FIRST_LOOKBACK = timedelta(hours=1)  # where a server that never read it starts
PAGE = 50
CALL_EVENTS = ("prefect.automation.action.failed", "prefect.automation.action.executed")


@dataclass(frozen=True)
class Undelivered:
    """One automation call that did not reach the receiver, rebuilt."""

    event_id: str  # the action.failed / action.executed event
    occurred: datetime
    signal: str
    job: str
    body: dict[str, Any]
    why: str  # what Prefect recorded: "status 401", "Webhook call failed: …"


def automation_kind(name: str) -> tuple[str, str] | None:
    """``backjobs-<job>-<kind>`` -> (job, signal); None for any other automation."""
    if not name.startswith(PREFIX):
        return None
    job, _, kind = name.removeprefix(PREFIX).rpartition("-")
    signal = SIGNAL_OF_KIND.get(kind)
    return (job, signal) if job and signal else None


def failure_of(event: dict[str, Any]) -> str | None:
    """Why a call event means the call did not arrive; None when it did (a 2xx answer)."""
    payload = event.get("payload") or {}
    if payload.get("action_type") != "call-webhook":
        return None
    if event.get("event") == "prefect.automation.action.failed":
        return str(payload.get("reason") or "the call failed")
    status = payload.get("status_code")
    if isinstance(status, int) and not 200 <= status < 300:
        return f"answered {status}"
    return None


async def read_watermark(api: httpx.AsyncClient, *, now: datetime) -> tuple[datetime, set[str]]:
    """Where the log was read up to, and the ids of the call events handled at that instant."""
    response = await api.get(f"/variables/name/{WATERMARK}")
    if response.status_code == 404:
        return now - FIRST_LOOKBACK, set()
    response.raise_for_status()
    value = response.json()["value"]
    return datetime.fromisoformat(value["until"]), {str(i) for i in value.get("handled") or ()}


async def write_watermark(api: httpx.AsyncClient, until: datetime, handled: set[str]) -> None:
    value = {"until": until.isoformat(), "handled": sorted(handled)}
    response = await api.patch(f"/variables/name/{WATERMARK}", json={"value": value})
    if response.status_code == 404:
        response = await api.post("/variables/", json={"name": WATERMARK, "value": value})
    response.raise_for_status()


async def undelivered_calls(
    api: httpx.AsyncClient, *, since: datetime, until: datetime, handled: set[str]
) -> list[Undelivered]:
    """The calls of backjobs automations that went wrong in [since, until], oldest first
    (those in ``handled`` left out)."""
    query = {
        "filter": {
            "occurred": {"since": since.isoformat(), "until": until.isoformat()},
            "event": {"name": list(CALL_EVENTS)},
            "resource": {"id_prefix": ["prefect.automation."]},
            "order": "ASC",
        },
        "limit": PAGE,
    }
    found: list[Undelivered] = []
    automations: dict[str, dict[str, Any] | None] = {}
    async for event in _events(api, query):
        why = failure_of(event)
        kind = automation_kind(str(event["resource"].get("prefect.resource.name") or ""))
        if why is None or kind is None or str(event["id"]) in handled:
            continue
        job, signal = kind
        name = str(event["resource"]["prefect.resource.name"])
        if name not in automations:
            automation_id = str(event["resource"]["prefect.resource.id"]).rpartition(".")[2]
            automations[name] = await _automation(api, automation_id, name=name)
        automation = automations[name]
        trigger = await _triggering_event(api, event)
        body = call_body(signal, job, automation, trigger) if automation else None
        if body is None:
            gone = "its triggering event" if automation else f"automation {name}"
            logger.error(
                "alert LOST: a %s call for job %s went wrong (%s) and cannot be rebuilt: "
                "%s is gone", signal, job, why, gone,
            )  # fmt: skip
            continue
        found.append(
            Undelivered(str(event["id"]), _time(event["occurred"]), signal, job, body, why)
        )
    return found


def call_body(
    signal: str, job: str, automation: dict[str, Any], trigger: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The body the automation sends (:func:`automations.wanted_automations`), from the
    automation and its triggering event; None when a needed event is missing."""
    body: dict[str, Any] = {"signal": signal, "job": job, "deployment_id": _deployment(automation)}
    if signal == "silent":
        return body
    if trigger is None:
        return None
    run_id = str(trigger["resource"]["prefect.resource.id"]).removeprefix("prefect.flow-run.")
    if signal == "state":
        return body | {"flow_run_id": run_id, "event_id": str(trigger["id"]),
                       "event": str(trigger["event"])}  # fmt: skip
    heartbeat = _heartbeat_seconds(automation)
    return body | {"flow_run_id": run_id, "last_heartbeat": str(trigger["occurred"]),
                   "last_event": str(trigger["event"]), "heartbeat_seconds": heartbeat}  # fmt: skip


def _deployment(automation: dict[str, Any]) -> str:
    """The deployment the automation's trigger watches (its ``match_related``)."""
    related = (automation.get("trigger") or {}).get("match_related") or []
    for match in [related] if isinstance(related, dict) else related:
        resource = str(match.get("prefect.resource.id") or "")
        if resource.startswith("prefect.deployment."):
            return resource.removeprefix("prefect.deployment.")
    raise ValueError(f"automation {automation.get('name')!r} watches no deployment")


def _heartbeat_seconds(automation: dict[str, Any]) -> int:
    """What the zombie call says: its payload holds the number deploy wrote in."""
    for action in automation.get("actions") or ():
        found = re.search(r'"heartbeat_seconds": (\d+)', str(action.get("payload") or ""))
        if found:
            return int(found.group(1))
    raise ValueError(f"automation {automation.get('name')!r} names no heartbeat interval")


async def completed_since(api: httpx.AsyncClient, deployment_id: str, moment: datetime) -> bool:
    """Whether the deployment has a run that completed after ``moment``: a ``silent`` call
    delivered late is then stale (the job ran since), and alerts nothing."""
    query = {
        "flow_runs": {
            "deployment_id": {"any_": [deployment_id]},
            "state": {"type": {"any_": ["COMPLETED"]}},
            "end_time": {"after_": moment.isoformat()},
        },
        "limit": 1,
    }
    response = await api.post("/flow_runs/filter", json=query)
    response.raise_for_status()
    return bool(response.json())


async def _events(api: httpx.AsyncClient, query: dict[str, Any]) -> Any:
    response = await api.post("/events/filter", json=query)
    while True:
        response.raise_for_status()
        page = response.json()
        for event in page.get("events") or ():
            yield event
        next_page = page.get("next_page")
        if not next_page:
            return
        response = await api.get(str(next_page).partition("/api")[2] or str(next_page))


async def _automation(
    api: httpx.AsyncClient, automation_id: str, *, name: str
) -> dict[str, Any] | None:
    """The automation that made the call; if a deploy has replaced it since (same name, new
    id), the one of that name now; None when there is none."""
    response = await api.get(f"/automations/{automation_id}")
    if response.status_code != 404:
        response.raise_for_status()
        return dict(response.json())
    query = {"automations": {"name": {"any_": [name]}}, "limit": 1}
    response = await api.post("/automations/filter", json=query)
    response.raise_for_status()
    found = response.json()
    return dict(found[0]) if found else None


async def _triggering_event(api: httpx.AsyncClient, event: dict[str, Any]) -> dict[str, Any] | None:
    ids = [
        str(r["prefect.resource.id"]).removeprefix("prefect.event.")
        for r in event.get("related") or ()
        if r.get("prefect.resource.role") == "triggering-event"
    ]
    if not ids:
        return None
    occurred = _time(event["occurred"])
    query = {
        "filter": {
            "id": {"id": ids[:1]},
            "occurred": {
                "since": (occurred - timedelta(days=1)).isoformat(),
                "until": (occurred + timedelta(minutes=1)).isoformat(),
            },
        },
        "limit": 1,
    }
    response = await api.post("/events/filter", json=query)
    response.raise_for_status()
    events = response.json().get("events") or []
    return dict(events[0]) if events else None


def _time(value: Any) -> datetime:
    found = datetime.fromisoformat(str(value))
    return found if found.tzinfo else found.replace(tzinfo=UTC)
