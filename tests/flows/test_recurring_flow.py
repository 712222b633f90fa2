"""ProcessRecurringTransactionsJob as Prefect runs it: rows created once, counts published."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from sqlalchemy import select

from backjobs.jobs.recurring_transactions import RecurringTransactionsResult
from backjobs.models import RecurringTransaction, Transaction, User
from flows.recurring_transactions import process_recurring_transactions_job
from tests.support.databases import Database

pytestmark = pytest.mark.usefixtures("prefect_harness")

AS_OF = datetime(2028, 3, 1, 0, 5, tzinfo=UTC)


def seed(db: Database) -> None:
    """A monthly definition on the 31st, a yearly one on Feb 29, and an invalid one."""
    with db.session() as s:
        user = User(email="payer@example.com")
        s.add(user)
        s.flush()
        common = {"owner_id": user.id, "amount": Decimal("99.9900"), "currency": "EUR"}
        s.add_all(
            [
                RecurringTransaction(**common, frequency="monthly", start_date=date(2027, 10, 31)),
                RecurringTransaction(**common, frequency="yearly", start_date=date(2024, 2, 29)),
                RecurringTransaction(
                    **common, frequency="fortnightly", start_date=date(2024, 1, 1)
                ),
            ]
        )
        s.commit()


def occurred(db: Database) -> list[tuple[int | None, str]]:
    with db.session() as s:
        query = select(Transaction.recurring_transaction_id, Transaction.occurred_on).order_by(
            Transaction.recurring_transaction_id, Transaction.occurred_on
        )
        return [(rid, day.isoformat()) for rid, day in s.execute(query)]


def test_the_flow_creates_each_occurrence_once(app_env: Database) -> None:
    seed(app_env)
    state = process_recurring_transactions_job(as_of=AS_OF, return_state=True)
    assert state.is_completed()
    # The invalid definition was skipped: the run says so in its state (issue 17, item 5).
    assert state.name == "Completed with problems"
    assert state.message == (
        "process-recurring-transactions-job: invalid=1 (the reasons are in the run's logs)"
    )
    assert state.result() == RecurringTransactionsResult(
        through="2028-03-01",
        definitions_processed=2,
        transactions_created=10,
        invalid=1,
        invalid_ids=(3,),
    )
    assert occurred(app_env) == [
        (1, "2027-10-31"), (1, "2027-11-30"), (1, "2027-12-31"), (1, "2028-01-31"),
        (1, "2028-02-29"),
        (2, "2024-02-29"), (2, "2025-02-28"), (2, "2026-02-28"), (2, "2027-02-28"),
        (2, "2028-02-29"),
    ]  # fmt: skip
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    table = json.loads(
        str({a.key: a.data for a in found}["process-recurring-transactions-job-result"])
    )
    assert {"count": "transactions_created", "value": "10"} in table
    assert {"count": "invalid_ids", "value": "3"} in table
    # The same run again (a retry, a manual re-run) creates nothing.
    again = process_recurring_transactions_job(as_of=AS_OF)
    assert (again.definitions_processed, again.transactions_created) == (0, 0)
    assert len(occurred(app_env)) == 10


def test_the_domains_warnings_reach_the_runs_logs_in_the_api(app_env: Database) -> None:
    # conftest no longer presets PREFECT_LOGGING_EXTRA_LOGGERS: the job base must do it.
    assert "PREFECT_LOGGING_EXTRA_LOGGERS" not in os.environ
    seed(app_env)
    state = process_recurring_transactions_job(as_of=AS_OF, return_state=True)
    APILogHandler().flush()  # sends every queued log
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    skipped = [log for log in logs if "Skipping recurring transaction 3" in log.message]
    assert len(skipped) == 1, [log.message for log in logs]
    assert skipped[0].name == "backjobs.jobs.recurring_transactions"
    assert skipped[0].level == logging.WARNING
