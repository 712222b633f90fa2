"""CleanupJob: its independent parts, as plain functions over an engine.

Deletes go in batches of ``BACKJOBS_DELETE_BATCH_SIZE`` rows, **each batch its own
transaction** (these functions commit: batching is the point; see
:mod:`backjobs.db.batched_delete`), so a million expired rows never hold one long lock.
A part interrupted half-way has committed what it deleted; the next run finishes the rest.

- :func:`delete_expired_refresh_tokens`: refresh tokens whose ``expires_at`` is before
  ``now``. A revoked token that has not expired yet is kept: the app may still want to
  recognise its reuse.
- :func:`empty_trash_bin`: markers whose ``deleted_at`` is older than the retention.
- :func:`delete_ended_outbox_rows`: ``app_tasks`` rows of the task types backjobs runs
  (``email_send``) that ended (``completed`` or ``failed``) longer than
  ``BACKJOBS_OUTBOX_RETENTION_DAYS`` ago; when a row ended is
  :func:`backjobs.outbox_admin.ended_at`. ``pending`` and ``processing`` rows are never
  deleted, however old: they are mail still to send.
- :func:`remove_orphaned_files`: ``stored_files`` still ``pending`` past the upload
  timeout. The stored object is deleted first, then the row. An object already gone counts
  as removed; one that cannot be removed keeps its row (the next run tries again) and is
  reported; a key that can never be an object of the storage (outside the root, the root
  itself, a directory, a name over NAME_MAX…; see :mod:`backjobs.storage`) is never
  touched, keeps its row and is reported as bad data. A storage root that is missing or
  unreadable fails the part before any row is touched (:class:`StorageRootUnusable`) —
  when there is an abandoned upload at all: with none the storage is not needed.

Each part returns a :class:`CleanupResult` holding its own counts (the others ``None``);
the flow merges them. A part that fails raises an error carrying what it counted before
failing (``partial_result``), so the run's summary keeps it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import ClassVar, NamedTuple

from sqlalchemy import Engine, delete, select

from backjobs.db.batched_delete import iter_delete_batches, iter_delete_where
from backjobs.models import (
    Marker,
    ProcessingStatus,
    RefreshToken,
    StoredFile,
    TaskStatus,
    TaskType,
)
from backjobs.outbox_admin import TASKS, ended_at
from backjobs.settings import Settings
from backjobs.storage import FileStorage, StorageUnavailable, UnsafeStorageKey, make_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanupResult:
    """What a CleanupJob run (or one of its parts) did; ``None``: that part did not report."""

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("orphaned_files_bad_keys",)  # rows left

    refresh_tokens_deleted: int | None = None
    markers_deleted: int | None = None
    orphaned_files_removed: int | None = None
    orphaned_files_bad_keys: int | None = None
    outbox_rows_deleted: int | None = None
    failed_parts: tuple[str, ...] = ()

    def merge(self, other: CleanupResult) -> CleanupResult:
        """This result with ``other``'s reported counts laid over it."""
        counts = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if f.name != "failed_parts" and getattr(other, f.name) is not None
        }
        return replace(self, **counts, failed_parts=self.failed_parts + other.failed_parts)


def delete_expired_refresh_tokens(
    engine: Engine, *, now: datetime, settings: Settings
) -> CleanupResult:
    """Delete refresh tokens that expired before ``now``."""
    batches = iter_delete_batches(
        engine, RefreshToken.expires_at, before=now, batch_size=settings.delete_batch_size
    )
    return CleanupResult(refresh_tokens_deleted=sum(batches))


def empty_trash_bin(engine: Engine, *, now: datetime, settings: Settings) -> CleanupResult:
    """Permanently delete markers in the trash for longer than the retention."""
    retention = timedelta(days=settings.trash_retention_days)
    batches = iter_delete_batches(
        engine, Marker.deleted_at, before=now - retention, batch_size=settings.delete_batch_size
    )
    return CleanupResult(markers_deleted=sum(batches))


ENDED = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)


def delete_ended_outbox_rows(engine: Engine, *, now: datetime, settings: Settings) -> CleanupResult:
    """Delete outbox rows that ended (completed or failed) longer than the retention ago."""
    cutoff = now - timedelta(days=settings.outbox_retention_days)
    ended_long_ago = (
        TASKS.c.task_type.in_([t.value for t in TaskType])
        & TASKS.c.status.in_(ENDED)
        & (ended_at() < cutoff)
    )
    batches = iter_delete_where(
        engine, TASKS, ended_long_ago, batch_size=settings.delete_batch_size
    )
    return CleanupResult(outbox_rows_deleted=sum(batches))


class ObjectOutcome(StrEnum):
    """What happened to one abandoned upload's stored object."""

    REMOVED = "removed"
    ALREADY_GONE = "already-gone"
    BAD_KEY = "bad-key"
    FAILED = "failed"


class ObjectRemoval(NamedTuple):
    outcome: ObjectOutcome
    detail: str = ""


@dataclass(frozen=True)
class OrphanedFilesReport:
    """Every abandoned upload seen by :func:`sweep_orphaned_files`, by what happened to it."""

    removed: int = 0
    already_gone: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    bad_keys: dict[int, str] = field(default_factory=dict)

    def as_result(self) -> CleanupResult:
        return CleanupResult(
            orphaned_files_removed=self.removed, orphaned_files_bad_keys=len(self.bad_keys)
        )


class OrphanedFilesError(RuntimeError):
    """Some abandoned uploads could not be removed; their rows are kept for the next run."""

    def __init__(self, report: OrphanedFilesReport) -> None:
        self.report = report
        self.partial_result = report.as_result()
        shown = "; ".join(
            f"stored_files id {i}: {why}" for i, why in list(report.failed.items())[:5]
        )
        more = f" (and {len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
        super().__init__(
            f"remove_orphaned_files: {len(report.failed)} stored object(s) could not be "
            f"removed, {report.removed} removed: {shown}{more}"
        )


class StorageRootUnusable(RuntimeError):
    """The storage root (BACKJOBS_STORAGE_ROOT) cannot be used; no row was deleted for it."""

    def __init__(self, problem: StorageUnavailable, *, before_walk: bool) -> None:
        self.partial_result = CleanupResult()
        kept = "no stored_files row was deleted" if before_walk else "the walk stopped"
        super().__init__(
            f"remove_orphaned_files: BACKJOBS_STORAGE_ROOT: {problem}; {kept} — set "
            "BACKJOBS_STORAGE_ROOT to the folder that holds the uploads"
        )


def remove_orphaned_files(
    engine: Engine, *, now: datetime, settings: Settings, storage: FileStorage | None = None
) -> CleanupResult:
    """Remove uploads still ``pending`` after the upload timeout, object first, then row.

    Raises :class:`OrphanedFilesError` (after every row was tried) when an object could
    not be removed, :class:`StorageRootUnusable` (before touching a row) when the storage
    root is missing or unreadable. ``storage`` defaults to the configured one.
    """
    storage = storage or make_storage(settings.storage_root)
    try:
        report = sweep_orphaned_files(engine, now=now, settings=settings, storage=storage)
    except StorageUnavailable as exc:
        raise StorageRootUnusable(exc, before_walk=False) from exc
    if report.failed:
        raise OrphanedFilesError(report)
    return report.as_result()


def sweep_orphaned_files(
    engine: Engine, *, now: datetime, settings: Settings, storage: FileStorage
) -> OrphanedFilesReport:
    """Walk the abandoned uploads in batches; each batch removes objects, then its rows."""
    cutoff = now - timedelta(hours=settings.upload_timeout_hours)
    batch_size = settings.delete_batch_size
    removed = gone = 0
    failed: dict[int, str] = {}
    bad: dict[int, str] = {}
    after = 0
    checked = False
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                select(StoredFile.id, StoredFile.storage_key)
                .where(
                    StoredFile.processing_status == ProcessingStatus.PENDING.value,
                    StoredFile.created_at < cutoff,
                    StoredFile.id > after,
                )
                .order_by(StoredFile.id)
                .limit(batch_size)
                # Two cleanup runs never work on the same row; the app finishing an
                # upload waits for this batch instead of racing it.
                .with_for_update(skip_locked=True)
            ).all()
            if rows and not checked:
                checked = _check_storage(storage)
            deletable = []
            for file_id, key in rows:
                removal = _remove_object(storage, file_id, key)
                if removal.outcome is ObjectOutcome.BAD_KEY:
                    bad[file_id] = removal.detail
                elif removal.outcome is ObjectOutcome.FAILED:
                    failed[file_id] = removal.detail
                else:
                    deletable.append(file_id)
                    gone += removal.outcome is ObjectOutcome.ALREADY_GONE
            if deletable:
                conn.execute(delete(StoredFile).where(StoredFile.id.in_(deletable)))
            removed += len(deletable)
        if len(rows) < batch_size:
            return OrphanedFilesReport(removed, gone, failed, bad)
        after = rows[-1].id


def _check_storage(storage: FileStorage) -> bool:
    """Checked before the first row is touched: with a mistyped root every object would look
    "already gone" and its row be deleted. With no abandoned upload the storage is not
    needed, so a fresh install without its storage folder cleans up fine."""
    try:
        storage.check()
    except StorageUnavailable as exc:
        raise StorageRootUnusable(exc, before_walk=True) from exc
    return True


def _remove_object(storage: FileStorage, file_id: int, key: str) -> ObjectRemoval:
    try:
        removed = storage.delete(key)
    except StorageUnavailable:
        raise  # the whole storage, not this object: stop (this batch's rows are kept)
    except UnsafeStorageKey as exc:
        log.error("stored_files id %s has a bad storage_key, left untouched: %s", file_id, exc)
        return ObjectRemoval(ObjectOutcome.BAD_KEY, str(exc))
    except OSError as exc:
        log.error("stored_files id %s: could not remove %r: %s", file_id, key, exc)
        return ObjectRemoval(ObjectOutcome.FAILED, f"{type(exc).__name__}: {exc.strerror or exc}")
    return ObjectRemoval(ObjectOutcome.REMOVED if removed else ObjectOutcome.ALREADY_GONE)
