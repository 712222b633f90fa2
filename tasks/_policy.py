"""The retry policy shared by every task: transient database errors retry on their own.

A task retries (exponential backoff with jitter) only when its exception is transient
(:func:`backjobs.db.is_transient_error`); anything else fails the task at once, since a
retry would fail the same way.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from backjobs.db import is_transient_error

DB_RETRIES = 3


def retry_on_transient(task_obj: Any, run: TaskRun, state: State[Any]) -> bool:
    """Retry only a transient database error (the task and its run are not consulted)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except Exception as raised:
            exc = raised
    return exc is not None and is_transient_error(exc)


DB_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": DB_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient,
}
"""``@task(**DB_TASK_OPTIONS)``: three retries after ≈2, 4, 8 s (±50 %), transient errors only."""
