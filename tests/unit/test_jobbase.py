"""Pure parts of the job base: names, the clock, result rendering."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from backjobs.cli.common import parse_as_of
from backjobs.orchestration.jobbase import resolve_as_of, result_rows
from backjobs.orchestration.prefect_yaml import kebab, seed_name

SEED_NAMES = {
    "CleanupJob": "cleanup-job",
    "EmailSendJob": "email-send-job",
    "ProcessRecurringTransactionsJob": "process-recurring-transactions-job",
    "PendingUsersReminderJob": "pending-users-reminder-job",
    "ExpireUnconfirmedRegistrationsJob": "expire-unconfirmed-registrations-job",
}


@pytest.mark.parametrize(("seed", "flow"), SEED_NAMES.items())
def test_flow_names_are_the_kebab_case_of_seed_names(seed: str, flow: str) -> None:
    assert kebab(seed) == flow
    assert seed_name(flow) == seed


def test_an_explicit_as_of_wins_and_becomes_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert resolve_as_of(datetime(2030, 1, 1, 2, tzinfo=plus2)) == datetime(2030, 1, 1, tzinfo=UTC)
    assert resolve_as_of(datetime(2030, 1, 1)).tzinfo is UTC


def test_without_a_run_as_of_is_now() -> None:
    before = datetime.now(UTC)
    got = resolve_as_of(None)
    assert before - timedelta(seconds=1) <= got <= datetime.now(UTC) + timedelta(seconds=1)
    assert got.tzinfo is not None


def test_cli_as_of_accepts_z_and_names_a_bad_value() -> None:
    assert parse_as_of("2030-01-01T00:00:00Z") == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(Exception, match="not-a-date"):
        parse_as_of("not-a-date")


def test_result_rows_show_counts_and_shorten_long_lists() -> None:
    @dataclass(frozen=True)
    class R:
        sent: int
        ids: tuple[int, ...]

    rows = result_rows(R(sent=3, ids=tuple(range(25))))
    assert rows[0] == {"count": "sent", "value": "3"}
    assert rows[1]["value"].endswith("(25 in all)")
