"""Which run is an orphan of its deployment's schedules (the pure rule; the server tests are
tests/flows/test_orphan_runs.py and tests/e2e/test_deploy.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace as Thing

from backjobs.orchestration.orphan_runs import fires_at, orphan_reason

SCHEDULE_ID = uuid.uuid4()


def run(
    *, auto: bool = True, kind: str | None = "SCHEDULE", by: uuid.UUID | None = SCHEDULE_ID
) -> Thing:
    created = None if kind is None else Thing(type=kind, id=by, display_value="email-cron")
    return Thing(auto_scheduled=auto, created_by=created)


def test_a_run_of_an_active_schedule_is_no_orphan() -> None:
    assert orphan_reason(run(), [Thing(id=SCHEDULE_ID, active=True)]) is None


def test_a_run_of_a_deleted_or_paused_schedule_is_an_orphan_named_by_its_schedule() -> None:
    gone = orphan_reason(run(), [Thing(id=uuid.uuid4(), active=True)])
    assert gone == f"schedule email-cron ({SCHEDULE_ID}) no longer exists on the deployment"
    paused = orphan_reason(run(), [Thing(id=SCHEDULE_ID, active=False)])
    assert paused == f"schedule email-cron ({SCHEDULE_ID}) is paused"


def test_runs_no_schedule_made_are_never_orphans() -> None:
    for made in (run(auto=False), run(kind=None), run(kind="USER"), run(by=None)):
        assert orphan_reason(made, []) is None, made


def cron(expression: str, zone: str = "UTC") -> Thing:
    return Thing(cron=expression, timezone=zone, day_or=True)


def test_a_run_whose_schedule_was_replaced_by_an_equal_one_is_no_orphan() -> None:
    """``prefect deploy`` recreates slug-less schedules under new ids: a run already due
    (Late, or taken by a worker) at a time the new schedule fires must still run."""
    due = run()
    due.expected_start_time = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)
    replaced = Thing(id=uuid.uuid4(), active=True, schedule=cron("0 23 * * *"))
    assert orphan_reason(due, [replaced]) is None
    elsewhere = Thing(id=uuid.uuid4(), active=True, schedule=cron("30 23 * * *"))
    assert orphan_reason(due, [elsewhere]) is not None
    paused_twin = Thing(id=uuid.uuid4(), active=False, schedule=cron("0 23 * * *"))
    assert orphan_reason(due, [paused_twin]) is not None


def test_fires_at_reads_the_cron_in_its_time_zone() -> None:
    eleven = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)
    assert fires_at(cron("0 23 * * *"), eleven)
    assert not fires_at(cron("0 23 * * *"), eleven + timedelta(minutes=1))
    assert fires_at(cron("0 6 * * *", "Europe/Berlin"), datetime(2026, 12, 7, 5, 0, tzinfo=UTC))
    assert fires_at(cron("0 6 * * *", "Europe/Berlin"), datetime(2026, 7, 7, 4, 0, tzinfo=UTC))
    assert fires_at(Thing(interval=timedelta(hours=1)), eleven)  # no cron: never refused
