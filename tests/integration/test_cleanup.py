"""CleanupJob's parts on a real database: exactly the expired rows go, in batches."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from backjobs.db.batched_delete import iter_delete_batches
from backjobs.jobs import cleanup
from backjobs.models import AppTask, Marker, RefreshToken, StoredFile, User
from backjobs.settings import load_settings
from tests.support.databases import Database
from tests.support.files import make_unremovable

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _user(db: Database) -> int:
    with db.session() as s:
        user = User(email=f"u{id(s)}@example.com")
        s.add(user)
        s.commit()
        return user.id


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_expired_refresh_tokens_are_deleted_in_batches(db: Database, batch_size: int) -> None:
    uid = _user(db)
    with db.session() as s:
        for i in range(10):
            s.add(
                RefreshToken(
                    user_id=uid, token_hash=f"old{i}", expires_at=NOW - timedelta(seconds=i + 1)
                )
            )
        s.add(RefreshToken(user_id=uid, token_hash="edge", expires_at=NOW))
        s.add(
            RefreshToken(
                user_id=uid,
                token_hash="live",
                expires_at=NOW + timedelta(days=1),
                revoked_at=NOW - timedelta(days=1),
            )
        )
        s.commit()
    batches = list(
        iter_delete_batches(db.engine, RefreshToken.expires_at, before=NOW, batch_size=batch_size)
    )
    assert sum(batches) == 10
    assert max(batches) <= batch_size
    with db.session() as s:
        assert set(s.scalars(select(RefreshToken.token_hash))) == {"edge", "live"}
    settings = load_settings(delete_batch_size=batch_size)
    again = cleanup.delete_expired_refresh_tokens(db.engine, now=NOW, settings=settings)
    assert again == cleanup.CleanupResult(refresh_tokens_deleted=0)


def test_trash_older_than_the_retention_is_purged(db: Database) -> None:
    uid = _user(db)
    retention = timedelta(days=30)
    settings = load_settings(trash_retention_days=30, delete_batch_size=2)
    with db.session() as s:
        s.add_all(
            [
                Marker(
                    owner_id=uid, title="old", deleted_at=NOW - retention - timedelta(seconds=1)
                ),
                Marker(
                    owner_id=uid, title="recent", deleted_at=NOW - retention + timedelta(hours=1)
                ),
                Marker(owner_id=uid, title="alive", deleted_at=None),
            ]
        )
        s.commit()
    result = cleanup.empty_trash_bin(db.engine, now=NOW, settings=settings)
    assert result == cleanup.CleanupResult(markers_deleted=1)
    with db.session() as s:
        assert set(s.scalars(select(Marker.title))) == {"recent", "alive"}


def _files(db: Database, root: Path, specs: list[tuple[str, str, timedelta]]) -> dict[str, int]:
    uid = _user(db)
    ids = {}
    with db.session() as s:
        for key, status, age in specs:
            row = StoredFile(
                owner_id=uid,
                storage_key=key,
                processing_status=status,
                created_at=NOW - age,
                size_bytes=1,
            )
            s.add(row)
            s.flush()
            ids[key] = row.id
        s.commit()
    return ids


def test_orphaned_uploads_are_removed_object_first(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "files"
    (root / "up").mkdir(parents=True)
    for name in ("old1", "old2", "fresh", "ready"):
        (root / "up" / name).write_bytes(b"data")
    (root / "locked").mkdir()
    (root / "locked" / "stuck").write_bytes(b"x")
    make_unremovable(root / "locked" / "stuck")
    (tmp_path / "outside").write_text("never touched")
    day = timedelta(hours=24)
    ids = _files(
        db,
        root,
        [
            ("up/old1", "pending", day + timedelta(minutes=1)),
            ("up/old2", "pending", 3 * day),
            ("up/gone", "pending", 2 * day),  # object already missing
            ("locked/stuck", "pending", 2 * day),  # cannot be removed
            ("../outside", "pending", 2 * day),  # bad data
            ("up/fresh", "pending", day - timedelta(minutes=1)),
            ("up/ready", "ready", 10 * day),
        ],
    )
    settings = load_settings(upload_timeout_hours=24, delete_batch_size=2, storage_root=root)
    with pytest.raises(cleanup.OrphanedFilesError) as raised:
        cleanup.remove_orphaned_files(db.engine, now=NOW, settings=settings)
    report = raised.value.report
    assert (report.removed, report.already_gone) == (3, 1)
    assert set(report.failed) == {ids["locked/stuck"]}
    assert set(report.bad_keys) == {ids["../outside"]}
    assert raised.value.partial_result == cleanup.CleanupResult(
        orphaned_files_removed=3, orphaned_files_bad_keys=1
    )
    with db.session() as s:
        left = set(s.scalars(select(StoredFile.storage_key)))
    assert left == {"locked/stuck", "../outside", "up/fresh", "up/ready"}
    assert not (root / "up" / "old1").exists() and not (root / "up" / "old2").exists()
    assert (root / "up" / "fresh").exists() and (root / "up" / "ready").exists()
    assert (tmp_path / "outside").read_text() == "never touched"
    assert f"stored_files id {ids['locked/stuck']}" in str(raised.value)


def test_a_few_expired_among_many_live_tokens(db: Database) -> None:
    """On PostgreSQL this takes the index walk; the test above takes the block walk."""
    uid = _user(db)
    with db.session() as s:
        for i in range(60):
            expires = NOW - timedelta(days=1) if i in (7, 42) else NOW + timedelta(days=i)
            s.add(RefreshToken(user_id=uid, token_hash=f"h{i}", expires_at=expires))
        s.commit()
    settings = load_settings(delete_batch_size=1)
    result = cleanup.delete_expired_refresh_tokens(db.engine, now=NOW, settings=settings)
    assert result.refresh_tokens_deleted == 2
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(RefreshToken)) == 58


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_ended_outbox_rows_past_the_retention_are_deleted(db: Database, batch_size: int) -> None:
    day = timedelta(days=1)
    cutoff = NOW - 30 * day
    rows = {
        # (status, created_at, next_attempt_at, completed_at, task_type)
        "sent-long-ago": ("completed", NOW - 40 * day, NOW - 40 * day, NOW - 31 * day, None),
        "sent-recently": ("completed", NOW - 40 * day, NOW - 40 * day, NOW - 29 * day, None),
        "sent-at-cutoff": ("completed", NOW - 40 * day, NOW - 40 * day, cutoff, None),
        "failed-long-ago": ("failed", NOW - 41 * day, NOW - 40 * day, None, None),
        "failed-after-retry": ("failed", NOW - 41 * day, NOW - 10 * day, None, None),
        "failed-stamped": ("failed", NOW - 41 * day, NOW - 41 * day, NOW - 31 * day, None),
        "pending-ancient": ("pending", NOW - 900 * day, NOW - 900 * day, None, None),
        "processing-ancient": ("processing", NOW - 900 * day, NOW - 900 * day, None, None),
        "pending-odd-stamp": ("pending", NOW - 900 * day, NOW - 900 * day, NOW - 900 * day, None),
        "other-task-type": ("failed", NOW - 900 * day, NOW - 900 * day, NOW - 900 * day, "x"),
    }
    with db.session() as s:
        for key, (status, created, due, completed, kind) in rows.items():
            s.add(
                AppTask(
                    task_type=kind or "email_send",
                    status=status,
                    payload={"key": key},
                    created_at=created,
                    next_attempt_at=due,
                    completed_at=completed,
                    locked_until=NOW - 899 * day if status == "processing" else None,
                )
            )
        s.commit()
    settings = load_settings(outbox_retention_days=30, delete_batch_size=batch_size)
    result = cleanup.delete_ended_outbox_rows(db.engine, now=NOW, settings=settings)
    assert result == cleanup.CleanupResult(outbox_rows_deleted=3)
    with db.session() as s:
        left = {task.payload["key"] for task in s.scalars(select(AppTask))}  # type: ignore[index]
    assert left == set(rows) - {"sent-long-ago", "failed-long-ago", "failed-stamped"}
    again = cleanup.delete_ended_outbox_rows(db.engine, now=NOW, settings=settings)
    assert again.outbox_rows_deleted == 0


def test_open_outbox_rows_are_never_deleted_however_old(db: Database) -> None:
    """Only status decides: a pending or processing row of any age is mail still to send."""
    ancient = datetime(2000, 1, 1, tzinfo=UTC)
    with db.session() as s:
        for i in range(7):
            s.add(
                AppTask(
                    task_type="email_send",
                    status=("pending", "processing")[i % 2],
                    payload={},
                    created_at=ancient,
                    next_attempt_at=ancient,
                    completed_at=ancient,
                    locked_until=ancient,
                )
            )
        s.commit()
    settings = load_settings(outbox_retention_days=1, delete_batch_size=2)
    result = cleanup.delete_ended_outbox_rows(db.engine, now=NOW, settings=settings)
    assert result.outbox_rows_deleted == 0
    assert _count(db, AppTask) == 7


def test_a_row_retried_while_the_prune_runs_is_kept(pg_db: Database) -> None:
    """The prune waits for the app's open transaction, then re-checks: a pending row stays."""
    old = NOW - timedelta(days=90)
    with pg_db.session() as s:
        rows = [
            AppTask(task_type="email_send", status="failed", payload={}, created_at=old)
            for _ in range(3)
        ]
        s.add_all(rows)
        s.commit()
        ids = [row.id for row in rows]
    settings = load_settings(outbox_retention_days=30, delete_batch_size=10)
    with pg_db.engine.connect() as app:
        # The app (or `backjobs outbox retry`) holds the row, changed but not committed yet.
        app.execute(update(AppTask).where(AppTask.id == ids[1]).values(status="pending"))
        with ThreadPoolExecutor(1) as pool:
            pruning = pool.submit(
                cleanup.delete_ended_outbox_rows, pg_db.engine, now=NOW, settings=settings
            )
            time.sleep(0.5)
            assert not pruning.done()  # waiting for the app's row lock
            app.commit()
            result = pruning.result(timeout=30)
    assert result.outbox_rows_deleted == 2
    with pg_db.session() as s:
        assert list(s.execute(select(AppTask.id, AppTask.status))) == [(ids[1], "pending")]
