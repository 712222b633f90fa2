"""Rebuilding an automation call that went wrong (pure parts of alert_redelivery): the body
must be the one the automation sends, read back from what deploy wrote."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest

from backjobs.orchestration.alert_redelivery import automation_kind, call_body, failure_of
from backjobs.orchestration.automations import wanted_automations

DEPLOYMENT = "0b7f3c3e-1111-4222-8333-944455556666"
RUN = "11111111-2222-4333-8444-555555555555"
EVENT = "99999999-8888-4777-8666-555555555555"


def automations(job: str) -> dict[str, dict[str, Any]]:
    found = wanted_automations(
        job, DEPLOYMENT, block_id="b", silent_after=timedelta(hours=2), heartbeat_seconds=45
    )
    return {a["name"]: a for a in found}


def rendered(automation: dict[str, Any], trigger: dict[str, Any]) -> dict[str, Any]:
    """The automation's payload with its Jinja placeholders filled in from ``trigger``."""
    payload = automation["actions"][0]["payload"]
    values = {
        "event.resource.id | replace('prefect.flow-run.', '')": trigger["resource"][
            "prefect.resource.id"
        ].removeprefix("prefect.flow-run."),
        "event.id": trigger["id"],
        "event.event": trigger["event"],
        "event.occurred": trigger["occurred"],
    }
    return dict(json.loads(re.sub(r"\{\{ (.+?) \}\}", lambda m: values[m.group(1)], payload)))


@pytest.mark.parametrize("job", ["email-send-job", "pending-users-reminder-job"])
def test_every_backjobs_automation_name_reads_back_as_its_job_and_signal(job: str) -> None:
    kinds = {name: automation_kind(name) for name in automations(job)}
    assert kinds == {
        f"backjobs-{job}-alert": (job, "state"),
        f"backjobs-{job}-zombie": (job, "zombie"),
        f"backjobs-{job}-silent": (job, "silent"),
    }
    assert automation_kind("ops-pager") is None
    assert automation_kind(f"backjobs-{job}-other") is None


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        ("alert", "prefect.flow-run.Failed"),
        ("zombie", "prefect.flow-run.heartbeat"),
        ("zombie", "prefect.flow-run.Pending"),
    ],
)
def test_a_rebuilt_call_is_the_body_the_automation_sends(kind: str, event: str) -> None:
    job = "cleanup-job"
    automation = automations(job)[f"backjobs-{job}-{kind}"]
    trigger = {
        "id": EVENT,
        "event": event,
        "occurred": "2026-12-07T06:00:00.123456Z",
        "resource": {"prefect.resource.id": f"prefect.flow-run.{RUN}"},
    }
    signal = "state" if kind == "alert" else "zombie"
    assert call_body(signal, job, automation, trigger) == rendered(automation, trigger)
    assert call_body(signal, job, automation, None) is None  # nothing to rebuild it from


def test_a_rebuilt_silent_call_needs_no_event() -> None:
    job = "cleanup-job"
    automation = automations(job)[f"backjobs-{job}-silent"]
    body = call_body("silent", job, automation, None)
    assert body == json.loads(automation["actions"][0]["payload"])
    assert body == {"signal": "silent", "job": job, "deployment_id": DEPLOYMENT}


@pytest.mark.parametrize(
    ("event", "payload", "why"),
    [
        ("prefect.automation.action.executed", {"status_code": 200}, None),
        ("prefect.automation.action.executed", {"status_code": 204}, None),
        ("prefect.automation.action.executed", {"status_code": 401}, "answered 401"),
        ("prefect.automation.action.executed", {"status_code": 503}, "answered 503"),
        ("prefect.automation.action.failed", {"reason": "Webhook call failed: ReadError('')"},
         "Webhook call failed: ReadError('')"),
    ],
)  # fmt: skip
def test_a_call_went_wrong_when_it_failed_or_was_answered_with_an_error(
    event: str, payload: dict[str, Any], why: str | None
) -> None:
    call = {"event": event, "payload": {"action_type": "call-webhook", **payload}}
    assert failure_of(call) == why
    other = {"event": event, "payload": {"action_type": "send-notification", **payload}}
    assert failure_of(other) is None
