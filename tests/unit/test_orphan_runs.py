"""Which run is an orphan of its deployment's schedules (the pure rule; the server tests are
tests/flows/test_orphan_runs.py and tests/e2e/test_deploy.py)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace as Thing

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
