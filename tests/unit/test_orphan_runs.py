"""Which run is an orphan of its deployment's schedules (the pure rule; the server tests are
tests/flows/test_orphan_runs.py and tests/e2e/test_deploy.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace as Thing

from backjobs.orchestration.crons import fires_at, next_fire
from backjobs.orchestration.orphan_runs import orphan_reason

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


def test_a_run_of_a_cron_edited_since_is_an_orphan_at_the_old_times_only() -> None:
    """A changed cron keeps its schedule's id: a run the scheduler made of the old cron (kept
    while queued for a slot, or inserted after the edit by the scheduler's race) is an
    orphan at a time the new cron does not fire, and no orphan at one it does."""
    edited_at = datetime(2026, 12, 6, 22, 58, tzinfo=UTC)
    edited = Thing(id=SCHEDULE_ID, active=True, schedule=cron("1-59/5 * * * *"), updated=edited_at)
    old = run()
    old.expected_start_time = datetime(2026, 12, 6, 23, 10, tzinfo=UTC)
    assert orphan_reason(old, [edited]) == (
        f"schedule email-cron ({SCHEDULE_ID}) no longer fires at 2026-12-06 23:10 UTC"
        " (its cron is now `1-59/5 * * * *`, UTC)"
    )
    also_new = run()
    also_new.expected_start_time = datetime(2026, 12, 6, 23, 11, tzinfo=UTC)
    assert orphan_reason(also_new, [edited]) is None
    # Another active schedule firing at the old time keeps the run, as for a removed one.
    other = Thing(id=uuid.uuid4(), active=True, schedule=cron("10 23 * * *"))
    assert orphan_reason(old, [edited, other]) is None
    # A run of the old cron due before the edit (Late, or queued for the slot) still runs,
    # as Prefect keeps it; so does one whose time or whose schedule's last change is unknown.
    late = run()
    late.expected_start_time = datetime(2026, 12, 6, 22, 50, tzinfo=UTC)
    assert orphan_reason(late, [edited]) is None
    assert orphan_reason(run(), [edited]) is None
    undated = Thing(id=SCHEDULE_ID, active=True, schedule=cron("1-59/5 * * * *"))
    assert orphan_reason(old, [undated]) is None


def test_a_cron_is_read_as_the_scheduler_reads_it_on_the_days_clocks_change() -> None:
    """``30 2 * * *`` in Europe/Berlin, across the night clocks go back (2027-10-31): after
    the run at 00:30 UTC the scheduler makes the next at 01:30 UTC on 1 November; croniter
    alone said 02:30 UTC, which ``stack status`` showed. The run the scheduler made is no
    orphan, and neither is the one after the spring change (02:30 does not exist then)."""
    berlin = cron("30 2 * * *", "Europe/Berlin")
    made = datetime(2027, 11, 1, 1, 30, tzinfo=UTC)
    assert next_fire(berlin, datetime(2027, 10, 31, 0, 30, tzinfo=UTC)) == made
    assert fires_at(berlin, made)
    assert not fires_at(berlin, made + timedelta(hours=1))
    # Its schedule last changed long before: only the cron's times decide.
    current = Thing(
        id=SCHEDULE_ID, active=True, schedule=berlin, updated=datetime(2027, 1, 1, tzinfo=UTC)
    )
    due = run()
    due.expected_start_time = made
    assert orphan_reason(due, [current]) is None
    spring = datetime(2027, 3, 28, 1, 30, tzinfo=UTC)
    assert next_fire(berlin, datetime(2027, 3, 27, 1, 30, tzinfo=UTC)) == spring
    due.expected_start_time = spring
    assert orphan_reason(due, [current]) is None
    due.expected_start_time = made + timedelta(hours=1)  # croniter's time that night
    assert orphan_reason(due, [current]) is not None


def test_a_cron_that_cannot_be_computed_never_refuses_a_run() -> None:
    unknown_zone = Thing(
        id=SCHEDULE_ID,
        active=True,
        schedule=cron("0 23 * * *", "Mars/Olympus"),
        updated=datetime(2026, 12, 1, tzinfo=UTC),
    )
    due = run()
    due.expected_start_time = datetime(2026, 12, 6, 23, 7, tzinfo=UTC)
    assert next_fire(unknown_zone.schedule, due.expected_start_time) is None
    assert orphan_reason(due, [unknown_zone]) is None
