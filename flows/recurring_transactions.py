"""ProcessRecurringTransactionsJob (``process-recurring-transactions-job``).

Every enabled recurring definition gets exactly one transaction per occurrence up to the
as_of date (UTC), missed days caught up, never twice. Invalid definitions are skipped,
logged with their id and reason, and counted ``invalid`` in the run's result; the run
still completes, so one bad row never blocks everybody else's transactions.

A disabled definition is skipped; re-enabled, it catches up from its last_processed_date,
disabled period included (the app sets last_processed_date on re-enabling to skip it).
See :mod:`backjobs.jobs.recurring_transactions` for the exactly-once argument.
"""

from __future__ import annotations

from datetime import datetime

from backjobs.jobs.recurring_transactions import RecurringTransactionsResult
from backjobs.orchestration.jobbase import job_flow
from tasks.recurring_transactions import process_recurring_transactions


@job_flow("ProcessRecurringTransactionsJob")
def process_recurring_transactions_job(as_of: datetime) -> RecurringTransactionsResult:
    """Create the due transactions of every enabled recurring definition up to as_of."""
    return process_recurring_transactions(as_of)
