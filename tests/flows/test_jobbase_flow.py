"""The job base under Prefect: the seed's log lines, re-raising, the as_of default."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

import pytest

from backjobs.orchestration.jobbase import job_flow
from backjobs.settings import get_settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass(frozen=True)
class Seen:
    as_of: datetime


@job_flow("ExampleJob")
def example_job(as_of: datetime) -> Seen:
    """Returns the clock it was given."""
    return Seen(as_of)


@dataclass(frozen=True)
class Tally:
    done: int
    failed: int
    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("failed",)


@job_flow("TallyJob")
def tally_job(as_of: datetime) -> Tally:
    return Tally(done=3, failed=as_of.day - 1)  # the 1st: none failed


@job_flow("BrokenJob")
def broken_job(as_of: datetime) -> Seen:
    raise ValueError("the disk is on fire")


@job_flow("InterruptedJob")
def interrupted_job(as_of: datetime) -> Seen:
    raise KeyboardInterrupt


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_job_flow_is_named_logs_and_gets_its_clock(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKJOBS_ALLOW_FUTURE_AS_OF", "true")
    caplog.set_level(logging.INFO)
    assert example_job.name == "example-job"
    assert example_job(as_of=datetime(2030, 5, 1, 12)).as_of == datetime(2030, 5, 1, 12, tzinfo=UTC)
    before = datetime.now(UTC)
    default = example_job().as_of  # the run's scheduled start: about now for a direct call
    assert default.tzinfo is not None and abs((default - before).total_seconds()) < 30
    text = messages(caplog)
    assert "[ExampleJob] Starting job execution" in text
    assert "[ExampleJob] Job completed successfully" in text


def test_a_failure_is_logged_with_traceback_and_re_raised(caplog: pytest.LogCaptureFixture) -> None:
    state = broken_job(return_state=True)
    assert state.is_failed() and "the disk is on fire" in (state.message or "")
    failed = [r for r in caplog.records if "[BrokenJob] Job failed with error" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR and failed[0].exc_info is not None


def test_a_cancellation_is_a_warning_and_re_raised(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(KeyboardInterrupt):
        interrupted_job()
    warned = [r for r in caplog.records if "[InterruptedJob] Job was cancelled" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING


def test_an_as_of_in_the_future_is_refused_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    state = example_job(as_of=tomorrow, return_state=True)
    assert state.is_failed()
    assert "in the future" in (state.message or "")
    assert "BACKJOBS_ALLOW_FUTURE_AS_OF" in (state.message or "")
    # A clock a little ahead (two minutes) is not the future.
    soon = datetime.now(UTC) + timedelta(minutes=2)
    assert example_job(as_of=soon).as_of == soon
    monkeypatch.setenv("BACKJOBS_ALLOW_FUTURE_AS_OF", "true")
    get_settings.cache_clear()
    assert example_job(as_of=tomorrow).as_of == tomorrow


def test_work_left_undone_completes_under_another_name_with_the_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 17, item 5: "Completed" over skipped rows is a defect; the UI shows the name."""
    caplog.set_level(logging.INFO)
    clean = tally_job(as_of=datetime(2020, 1, 1), return_state=True)
    assert (clean.type.value, clean.name) == ("COMPLETED", "Completed")
    troubled = tally_job(as_of=datetime(2020, 1, 3), return_state=True)
    assert troubled.is_completed() and troubled.type.value == "COMPLETED"
    assert troubled.name == "Completed with problems"
    assert troubled.message == "tally-job: failed=2 (the reasons are in the run's logs)"
    assert troubled.result() == Tally(done=3, failed=2)
    assert tally_job(as_of=datetime(2020, 1, 3)) == Tally(done=3, failed=2)  # a plain call
    text = messages(caplog)
    assert "[TallyJob] Job completed with problems: failed=2" in text
    assert text.count("[TallyJob] Job completed successfully") == 1  # the clean run only
