"""The zombie check's new state (pure part of alert_zombie): Crashed, or Cancelled for a run
being cancelled, and a message saying what was last heard of the run, when, and on which
worker — the state an operator reads in the UI after a machine died."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from backjobs.orchestration.alert_zombie import zombie_state

NOW = datetime(2026, 12, 8, 6, 2, 0, tzinfo=UTC)
RUN = {"labels": {"prefect.worker.name": "ProcessWorker 9f2c"}, "infrastructure_pid": "h:4242"}


def state(state_type: str, run: dict[str, Any] = RUN, **body: Any) -> dict[str, str]:
    call = {"last_heartbeat": "2026-12-08T06:00:30.000000Z", "heartbeat_seconds": "30", **body}
    return zombie_state(run | {"state_type": state_type}, call, now=NOW)


def test_a_running_run_whose_heartbeats_stopped_names_its_last_heartbeat_and_worker() -> None:
    assert state("RUNNING", last_event="prefect.flow-run.heartbeat") == {
        "type": "CRASHED",
        "name": "Crashed",
        "message": "Crashed by the zombie detector: heartbeats stopped (last heartbeat"
        " 2026-12-08 06:00:30 UTC, 90 s before, expected every 30 s); ran on worker"
        " ProcessWorker 9f2c (process h:4242).",
    }


@pytest.mark.parametrize("event", ["prefect.flow-run.Running", "prefect.flow-run.Pending"])
def test_a_running_run_that_never_sent_a_heartbeat_says_so(event: str) -> None:
    """Running, whichever event opened the window (the Running event may be late)."""
    message = state("RUNNING", last_event=event)["message"]
    assert "(no heartbeat since it went Running at 2026-12-08 06:00:30 UTC, 90 s before," in (
        message
    )


def test_a_pending_run_says_it_never_started_and_who_took_it_as_far_as_known() -> None:
    assert state("PENDING", last_event="prefect.flow-run.Pending")["message"] == (
        "Crashed by the zombie detector: the run never started (Pending since 2026-12-08"
        " 06:00:30 UTC, 90 s before: worker ProcessWorker 9f2c took it and no process of it"
        " ran)."
    )
    # What a dead worker leaves: no worker named on the run yet, only its pool.
    bare = {"work_pool_name": "backjobs"}
    assert state("PENDING", bare, last_event="prefect.flow-run.Pending")["message"] == (
        "Crashed by the zombie detector: the run never started (Pending since 2026-12-08"
        " 06:00:30 UTC, 90 s before: a worker of pool 'backjobs' took it and no process of it"
        " ran)."
    )


def test_a_run_being_cancelled_is_cancelled_as_its_user_asked_saying_why() -> None:
    stopped = state("CANCELLING", last_event="prefect.flow-run.heartbeat")
    assert (stopped["type"], stopped["name"]) == ("CANCELLED", "Cancelled")
    assert stopped["message"] == (
        "Cancelled by the zombie detector: no worker finished cancelling it, and heartbeats"
        " stopped (last heartbeat 2026-12-08 06:00:30 UTC, 90 s before, expected every 30 s);"
        " ran on worker ProcessWorker 9f2c (process h:4242)."
    )
    never = state("CANCELLING", {}, last_event="prefect.flow-run.Pending")
    assert never["message"] == (
        "Cancelled by the zombie detector: no worker finished cancelling it, and the run never"
        " started (Pending since 2026-12-08 06:00:30 UTC, 90 s before: a worker took it and no"
        " process of it ran)."
    )


def test_a_call_of_an_automation_an_older_deploy_made_reads_as_a_heartbeat() -> None:
    assert "(last heartbeat 2026-12-08 06:00:30 UTC, 90 s before," in state("RUNNING")["message"]
    bare = zombie_state({"state_type": "RUNNING"}, {}, now=NOW)
    assert bare["message"] == (
        "Crashed by the zombie detector: heartbeats stopped (no heartbeat received);"
        " ran on an unknown worker."
    )
