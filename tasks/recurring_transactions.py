"""ProcessRecurringTransactionsJob's task: one unit, retried on its own for transient DB errors.

The task commits batch by batch (each keyset batch of definitions is its own transaction,
see :mod:`backjobs.jobs.recurring_transactions`). A retry, or a second run at the same
time, is safe: what was committed is not redone (last_processed_date has moved, the unique
key holds).
"""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs.db import get_engine
from backjobs.jobs import recurring_transactions
from backjobs.jobs.recurring_transactions import RecurringTransactionsResult
from backjobs.settings import get_settings
from tasks._policy import DB_TASK_OPTIONS


@task(**DB_TASK_OPTIONS)
def process_recurring_transactions(as_of: datetime) -> RecurringTransactionsResult:
    """Create every due occurrence of every enabled definition up to as_of's date."""
    return recurring_transactions.process_recurring_transactions(
        get_engine(), now=as_of, settings=get_settings()
    )
