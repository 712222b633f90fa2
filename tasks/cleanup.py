"""CleanupJob's tasks: one per part, each retried on its own for transient DB errors."""

from __future__ import annotations

from datetime import datetime, timedelta

from prefect import task

from backjobs import cleanup
from backjobs.db import get_engine
from backjobs.settings import get_settings
from backjobs.storage import make_storage
from tasks._policy import DB_TASK_OPTIONS


@task(name="expired-sessions", **DB_TASK_OPTIONS)
def delete_expired_sessions(as_of: datetime) -> int:
    """Delete refresh tokens that expired before as_of."""
    settings = get_settings()
    return cleanup.delete_expired_refresh_tokens(
        get_engine(), now=as_of, batch_size=settings.delete_batch_size
    )


@task(name="trash-bin", **DB_TASK_OPTIONS)
def empty_trash_bin(as_of: datetime) -> int:
    """Permanently delete markers in the trash longer than the retention."""
    settings = get_settings()
    return cleanup.empty_trash_bin(
        get_engine(),
        now=as_of,
        retention=timedelta(days=settings.trash_retention_days),
        batch_size=settings.delete_batch_size,
    )


@task(name="orphaned-files", **DB_TASK_OPTIONS)
def remove_orphaned_files(as_of: datetime) -> dict[str, int]:
    """Remove abandoned uploads; fails (after finishing every row) if any object stayed."""
    settings = get_settings()
    result = cleanup.remove_orphaned_files(
        get_engine(),
        now=as_of,
        upload_timeout=timedelta(hours=settings.upload_timeout_hours),
        storage=make_storage(settings.storage_root),
        batch_size=settings.delete_batch_size,
    )
    if result.failed:
        raise cleanup.OrphanedFilesError(result)
    return {"removed": result.removed, "bad_keys": len(result.bad_keys)}
