"""ProcessRecurringTransactionsJob's task: one unit, retried on its own for transient DB errors.

The task commits batch by batch (each keyset batch of definitions is its own transaction,
see :mod:`backjobs.recurring`). A retry, or a second run at the same time, is safe: what
was committed is not redone (last_processed_date has moved, the unique key holds).
"""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs import recurring
from backjobs.db import get_engine
from tasks._policy import DB_TASK_OPTIONS


@task(name="create-recurring-transactions", **DB_TASK_OPTIONS)
def create_recurring_transactions(as_of: datetime) -> recurring.RecurringResult:
    """Create every due occurrence of every enabled definition up to as_of's date."""
    return recurring.process_recurring(get_engine(), as_of=as_of)
