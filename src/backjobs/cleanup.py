"""CleanupJob's three parts, as plain functions over an engine.

Deletes go in batches of about ``batch_size`` rows, **each batch its own transaction**
(these functions commit: batching is the point; see :mod:`backjobs.batched_delete`), so
a million expired rows never hold one long lock. A part interrupted half-way has
committed what it deleted; the next run finishes the rest.

- expired sessions: refresh tokens whose ``expires_at`` is before ``now``. A revoked token
  that has not expired yet is kept: the app may still want to recognise its reuse.
- trash bin: markers whose ``deleted_at`` is older than the retention.
- orphaned files: ``stored_files`` still ``pending`` past the upload timeout. The stored
  object is deleted first, then the row. An object already gone counts as removed; one
  that cannot be removed keeps its row (the next run tries again) and is reported; a key
  outside the storage root is never touched, keeps its row and is reported as bad data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select

from backjobs.batched_delete import iter_delete_batches
from backjobs.models import Marker, ProcessingStatus, RefreshToken, StoredFile
from backjobs.storage import FileStorage, UnsafeStorageKey

log = logging.getLogger(__name__)


def delete_expired_refresh_tokens(engine: Engine, *, now: datetime, batch_size: int) -> int:
    """Delete refresh tokens that expired before ``now``; returns how many."""
    batches = iter_delete_batches(
        engine, RefreshToken.expires_at, before=now, batch_size=batch_size
    )
    return sum(batches)


def empty_trash_bin(engine: Engine, *, now: datetime, retention: timedelta, batch_size: int) -> int:
    """Permanently delete markers in the trash for longer than ``retention``."""
    batches = iter_delete_batches(
        engine, Marker.deleted_at, before=now - retention, batch_size=batch_size
    )
    return sum(batches)


@dataclass(frozen=True)
class OrphanedFilesResult:
    removed: int = 0
    already_gone: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    bad_keys: dict[int, str] = field(default_factory=dict)


class OrphanedFilesError(RuntimeError):
    """Some abandoned uploads could not be removed; their rows are kept for the next run."""

    def __init__(self, result: OrphanedFilesResult) -> None:
        self.result = result
        shown = "; ".join(
            f"stored_files id {i}: {why}" for i, why in list(result.failed.items())[:5]
        )
        more = f" (and {len(result.failed) - 5} more)" if len(result.failed) > 5 else ""
        super().__init__(
            f"orphaned-files: {len(result.failed)} stored object(s) could not be removed, "
            f"{result.removed} removed: {shown}{more}"
        )


def remove_orphaned_files(
    engine: Engine,
    *,
    now: datetime,
    upload_timeout: timedelta,
    storage: FileStorage,
    batch_size: int,
) -> OrphanedFilesResult:
    """Remove uploads still ``pending`` after ``upload_timeout``, object first, then row."""
    cutoff = now - upload_timeout
    removed = gone = 0
    failed: dict[int, str] = {}
    bad: dict[int, str] = {}
    after = 0
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
            deletable = []
            for file_id, key in rows:
                outcome, detail = _remove_object(storage, file_id, key)
                if outcome == "bad":
                    bad[file_id] = detail
                elif outcome == "failed":
                    failed[file_id] = detail
                else:
                    deletable.append(file_id)
                    gone += outcome == "gone"
            if deletable:
                conn.execute(delete(StoredFile).where(StoredFile.id.in_(deletable)))
            removed += len(deletable)
        if len(rows) < batch_size:
            return OrphanedFilesResult(removed, gone, failed, bad)
        after = rows[-1].id


def _remove_object(storage: FileStorage, file_id: int, key: str) -> tuple[str, str]:
    """("removed" | "gone" | "bad" | "failed", detail)."""
    try:
        return ("removed" if storage.delete(key) else "gone"), ""
    except UnsafeStorageKey as exc:
        log.error("stored_files id %s has a bad storage_key, left untouched: %s", file_id, exc)
        return "bad", str(exc)
    except OSError as exc:
        log.error("stored_files id %s: could not remove %r: %s", file_id, key, exc)
        return "failed", f"{type(exc).__name__}: {exc.strerror or exc}"
