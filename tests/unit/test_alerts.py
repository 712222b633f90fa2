"""The alert rules: one incident per job, repeats, recovery, silence (pure logic)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from backjobs.mail.render import render_email
from backjobs.orchestration.alert_delivery import (
    RECEIVER_DELAYS,
    alert_document,
    alert_key,
    retrying,
)
from backjobs.orchestration.alert_store import (
    incident_from_record,
    incident_record,
    variable_name,
)
from backjobs.orchestration.alerts import AlertKind, IncidentBook, RunInfo, silent_window
from backjobs.orchestration.automations import (
    JobSchedule,
    cron_period,
    job_silent_window,
    run_heartbeat,
    wanted_automations,
)
from backjobs.settings import SettingsError, load_settings

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def run(n: int, state: str = "Failed") -> RunInfo:
    return RunInfo(flow_run_id=f"id-{n}", name=f"run-{n}", state=state, message=f"boom {n}")


def test_first_failure_alerts_then_repeats_at_most_every_repeat_with_the_count() -> None:
    book = IncidentBook(repeat=timedelta(minutes=60))
    first = book.failure("email-send-job", run(1), now=T0)
    assert first is not None and first.kind is AlertKind.FAILED
    assert (first.failures, first.new_failures, first.first_failure_at) == (1, 1, T0)
    for n in range(2, 6):
        assert book.failure("email-send-job", run(n), now=T0 + timedelta(minutes=n)) is None
    assert book.due(now=T0 + timedelta(minutes=59)) == []
    [again] = book.due(now=T0 + timedelta(minutes=60))
    assert again.kind is AlertKind.STILL_FAILING
    assert (again.failures, again.new_failures, again.run) == (5, 4, run(5))
    assert book.due(now=T0 + timedelta(minutes=200)) == []  # nothing new to report
    later = book.failure("email-send-job", run(6), now=T0 + timedelta(minutes=121))
    assert later is not None and (later.kind, later.new_failures) == (AlertKind.STILL_FAILING, 1)


def test_recovery_is_one_notice_counting_what_was_not_reported() -> None:
    book = IncidentBook(repeat=timedelta(minutes=60))
    book.failure("cleanup-job", run(1), now=T0)
    book.failure("cleanup-job", run(2), now=T0 + timedelta(minutes=1))
    done = book.completed("cleanup-job", run(3, "Completed"), now=T0 + timedelta(minutes=2))
    assert done is not None and done.kind is AlertKind.RECOVERED
    assert (done.failures, done.new_failures) == (2, 1)
    assert book.completed("cleanup-job", run(4, "Completed"), now=T0 + timedelta(minutes=3)) is None


def test_each_job_is_its_own_incident_and_repeat_zero_alerts_every_failure() -> None:
    book = IncidentBook(repeat=timedelta(0))
    kinds = [book.failure("a", run(n), now=T0) for n in range(3)]
    assert [k.kind if k else None for k in kinds] == [
        AlertKind.FAILED,
        AlertKind.STILL_FAILING,
        AlertKind.STILL_FAILING,
    ]
    other = book.failure("b", run(9), now=T0)
    assert other is not None and other.kind is AlertKind.FAILED


def test_silence_alerts_once_not_while_failing_and_recovers() -> None:
    book = IncidentBook(repeat=timedelta(minutes=60))
    silent = book.silent("cleanup-job", now=T0)
    assert silent is not None and silent.kind is AlertKind.SILENT and silent.run is None
    assert book.silent("cleanup-job", now=T0 + timedelta(hours=1)) is None
    back = book.completed("cleanup-job", run(1, "Completed"), now=T0 + timedelta(hours=2))
    assert back is not None and back.kind is AlertKind.RECOVERED
    book.failure("email-send-job", run(2), now=T0)
    assert book.silent("email-send-job", now=T0 + timedelta(minutes=10)) is None


def test_silent_window_is_periods_of_the_cron_never_under_the_floor() -> None:
    every_2 = JobSchedule("*/2 * * * *", "UTC", True, True)
    daily = JobSchedule("0 23 * * *", "UTC", True, True)
    assert cron_period(every_2, now=T0) == timedelta(minutes=2)
    assert cron_period(daily, now=T0) == timedelta(days=1)
    floor = timedelta(minutes=10)
    assert job_silent_window([every_2], periods=3, floor=floor, now=T0) == floor
    assert job_silent_window([daily], periods=3, floor=floor, now=T0) == timedelta(days=3)
    paused = daily._replace(active=False)
    assert job_silent_window([paused], periods=3, floor=floor, now=T0) is None
    assert silent_window(period=timedelta(hours=1), periods=2) == timedelta(hours=2)


def test_the_alert_email_names_job_run_state_parts_count_and_link() -> None:
    book = IncidentBook(repeat=timedelta(0))
    book.failure("cleanup-job", run(1), now=T0)
    failing = RunInfo("abc", "lucky-fox", "Failed", "1 of 4 parts failed", ("delete: no disk",))
    alert = book.failure("cleanup-job", failing, now=T0 + timedelta(minutes=5))
    assert alert is not None
    document = alert_document(alert, public_url="https://jobs.example/", deployment_id="d")
    assert document["url"] == "https://jobs.example/runs/flow-run/abc"
    assert {k: document[k] for k in ("job", "kind", "flow_run_id", "state")} == {
        "job": "cleanup-job",
        "kind": "still failing",
        "flow_run_id": "abc",
        "state": "Failed",
    }
    context = {k: v for k, v in document.items() if k != "message"} | {
        "message": document["message"]
    }
    email = render_email("job-alert", context)
    assert "cleanup-job" in email.subject and "still failing" in email.subject
    for text in ("lucky-fox", "1 of 4 parts failed", "delete: no disk", "2030-01-01 12:00"):
        assert text in email.text, text
    assert "https://jobs.example/runs/flow-run/abc" in email.html


def test_an_incident_round_trips_through_its_stored_record() -> None:
    book = IncidentBook(repeat=timedelta(minutes=60))
    long_run = RunInfo("abc", "lucky-fox", "Failed", "x" * 9000, tuple(f"p{i}" for i in range(30)))
    book.failure("Email Job", long_run, now=T0)
    incident = book.incidents["Email Job"]
    incident.seen = [f"event-{i}" for i in range(50)]
    record = incident_record("Email Job", incident)
    assert len(json.dumps(record)) < 5000  # what a Prefect Variable holds
    job, back = incident_from_record(json.loads(json.dumps(record)))
    assert job == "Email Job"
    assert (back.opened_at, back.failures, back.reported) == (T0, 1, 1)
    assert back.last_run is not None and back.last_run.failed_parts == long_run.failed_parts[:10]
    assert back.seen == incident.seen[-20:]
    assert variable_name("email-send-job") == "backjobs-incident-email-send-job"
    assert re.fullmatch(r"backjobs-incident-email_job-[0-9a-f]{8}", variable_name("Email Job"))


def test_a_transient_error_is_retried_and_a_permanent_one_is_not() -> None:
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    def flaky(failures: list[Exception]) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            if failures:
                raise failures.pop(0)
            return "read"

        return call

    request = httpx.Request("GET", "http://prefect-in-memory/api/flow_runs/x")
    locked = OperationalError("UPDATE …", {}, Exception("database is locked"))
    busy = httpx.HTTPStatusError("503", request=request, response=httpx.Response(503))
    refused = httpx.ConnectError("connection refused", request=request)
    got = asyncio.run(retrying("reading", flaky([locked, busy, refused]), sleep=pause))
    assert got == "read" and pauses == list(RECEIVER_DELAYS[:3])

    pauses.clear()
    missing = httpx.HTTPStatusError("404", request=request, response=httpx.Response(404))
    with pytest.raises(httpx.HTTPStatusError):
        asyncio.run(retrying("reading", flaky([missing]), sleep=pause))
    assert pauses == []  # a 404 is an answer, not a hiccup

    always = [refused] * (len(RECEIVER_DELAYS) + 1)
    with pytest.raises(httpx.ConnectError):
        asyncio.run(retrying("reading", flaky(always), sleep=pause))
    assert pauses == list(RECEIVER_DELAYS)  # every delay waited, then the error


def test_the_alert_emails_dedup_key_is_one_per_incident_kind_and_count() -> None:
    book = IncidentBook(repeat=timedelta(0))
    first = book.failure("a", run(1), now=T0)
    second = book.failure("a", run(2), now=T0)
    assert first is not None and second is not None
    assert alert_key(first) != alert_key(second)
    assert alert_key(first) == alert_key(first._replace(at=T0 + timedelta(hours=1)))
    assert len(alert_key(first)) <= 255


def test_a_silent_floor_under_10_minutes_needs_the_test_rig_opt_in() -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(alert_silent_min_minutes=0.25)
    message = str(refused.value)
    assert "BACKJOBS_ALERT_SILENT_MIN_MINUTES" in message
    assert "BACKJOBS_ALERT_ALLOW_SHORT_SILENCE=true" in message
    assert load_settings(alert_silent_min_minutes=10).alert_silent_min_minutes == 10
    rig = load_settings(alert_silent_min_minutes=0.25, alert_allow_short_silence=True)
    assert rig.alert_silent_min_minutes == 0.25


# --- The zombie window follows the runs' heartbeat ---------------------------------------

SETTING = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@pytest.mark.parametrize(
    ("run_env", "deploying", "seconds", "source"),
    [
        ({SETTING: "30"}, None, 30, "from the job template of pool 'backjobs'"),
        ({SETTING: " 120 "}, "30", 120, "from the job template"),  # the pool's value wins
        ({}, "60", 60, f"this shell's {SETTING} (pool 'backjobs' leaves {SETTING} to the"),
        ({}, None, 180, f"Prefect's default (pool 'backjobs' leaves {SETTING} to the"),
        ({SETTING: None}, None, 180, "Prefect's default"),  # unset by the deployment
        ({}, "ten", 180, "Prefect's default"),  # a shell value Prefect would refuse
        ({}, "29", 180, "Prefect's default"),
    ],
)
def test_the_heartbeat_is_the_one_the_runs_get(
    run_env: dict[str, str | None], deploying: str | None, seconds: int, source: str
) -> None:
    beat = run_heartbeat(run_env, pool="backjobs", deploying=deploying, prefect_default=180)
    assert (beat.seconds, beat.problem) == (seconds, None)
    assert beat.source.startswith(source), beat.source


@pytest.mark.parametrize("value", ["ten", "10", "29", "30.5", ""])
def test_a_heartbeat_the_runs_would_refuse_is_a_problem_naming_pool_and_value(
    value: str,
) -> None:
    beat = run_heartbeat({SETTING: value}, pool="etl", deploying="30", prefect_default=180)
    assert beat.seconds == 180  # the longest wait: no healthy run is crashed on a guess
    assert beat.problem is not None
    assert f"pool 'etl' sets {SETTING}={value!r}" in beat.problem
    assert "at least 30" in beat.problem and "fail to start" in beat.problem


def test_the_zombie_trigger_waits_three_heartbeats() -> None:
    automations = wanted_automations(
        "cleanup-job", "d-1", block_id="b-1", silent_after=None, heartbeat_seconds=180
    )
    [zombie] = [a for a in automations if a["name"] == "backjobs-cleanup-job-zombie"]
    assert zombie["trigger"]["within"] == 540
    assert '"heartbeat_seconds": 180' in zombie["actions"][0]["payload"]
