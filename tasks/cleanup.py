"""CleanupJob's tasks: one per part, each retried on its own for transient DB errors."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs.db import get_engine
from backjobs.jobs import cleanup
from backjobs.jobs.cleanup import CleanupResult
from backjobs.settings import get_settings
from tasks._policy import DB_TASK_OPTIONS


@task(**DB_TASK_OPTIONS)
def delete_expired_refresh_tokens(as_of: datetime) -> CleanupResult:
    """Delete refresh tokens that expired before as_of."""
    return cleanup.delete_expired_refresh_tokens(get_engine(), now=as_of, settings=get_settings())


@task(**DB_TASK_OPTIONS)
def empty_trash_bin(as_of: datetime) -> CleanupResult:
    """Permanently delete markers in the trash longer than the retention."""
    return cleanup.empty_trash_bin(get_engine(), now=as_of, settings=get_settings())


@task(**DB_TASK_OPTIONS)
def remove_orphaned_files(as_of: datetime) -> CleanupResult:
    """Remove abandoned uploads; fails (after finishing every row) if any object stayed."""
    return cleanup.remove_orphaned_files(get_engine(), now=as_of, settings=get_settings())


@task(**DB_TASK_OPTIONS)
def delete_ended_outbox_rows(as_of: datetime) -> CleanupResult:
    """Delete outbox rows that ended (completed, failed) longer than the retention ago."""
    return cleanup.delete_ended_outbox_rows(get_engine(), now=as_of, settings=get_settings())
