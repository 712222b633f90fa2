"""remove_orphaned_files against a storage root that is wrong, and keys that are bad data."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from backjobs.jobs import cleanup
from backjobs.models import StoredFile, User
from backjobs.settings import load_settings
from tests.support.databases import Database

NOW = datetime(2030, 1, 1, tzinfo=UTC)
OLD = NOW - timedelta(days=3)


def _pending(db: Database, keys: list[str]) -> dict[str, int]:
    with db.session() as s:
        user = User(email="owner@example.com")
        s.add(user)
        s.flush()
        rows = {key: StoredFile(owner_id=user.id, storage_key=key, created_at=OLD) for key in keys}
        s.add_all(rows.values())
        s.commit()
        return {key: row.id for key, row in rows.items()}


def _keys_left(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.scalars(select(StoredFile.storage_key)))


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_an_unusable_storage_root_fails_the_part_and_keeps_every_row(
    db: Database, tmp_path: Path, kind: str
) -> None:
    root = tmp_path / "mistyped"
    if kind == "a file":
        root.write_text("not a folder")
    _pending(db, ["up/a", "up/b"])
    settings = load_settings(storage_root=root, upload_timeout_hours=24)
    with pytest.raises(cleanup.StorageRootUnusable) as raised:
        cleanup.remove_orphaned_files(db.engine, now=NOW, settings=settings)
    message = str(raised.value)
    assert "BACKJOBS_STORAGE_ROOT" in message and str(root) in message
    assert "no stored_files row was deleted" in message
    assert _keys_left(db) == {"up/a", "up/b"}


def test_keys_that_can_never_be_objects_are_bad_data_and_the_run_goes_on(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "files"
    (root / "up" / "dir").mkdir(parents=True)
    (root / "up" / "dir" / "inner").write_bytes(b"x")
    (root / "up" / "good").write_bytes(b"x")
    # (A key over PATH_MAX does not fit the 1024-character column: see the unit tests.)
    bad = [".", "up/dir", "up/", "n" * 300, ""]
    ids = _pending(db, [*bad, "up/good"])
    settings = load_settings(storage_root=root, upload_timeout_hours=24, delete_batch_size=3)
    with caplog.at_level(logging.ERROR, logger="backjobs"):
        result = cleanup.remove_orphaned_files(db.engine, now=NOW, settings=settings)
    assert result == cleanup.CleanupResult(orphaned_files_removed=1, orphaned_files_bad_keys=5)
    assert _keys_left(db) == set(bad)
    assert not (root / "up" / "good").exists()
    assert (root / "up" / "dir" / "inner").exists()
    logged = caplog.text
    assert f"stored_files id {ids['up/dir']} has a bad storage_key" in logged
    assert "names a directory" in logged and "NAME_MAX" in logged


def test_without_abandoned_uploads_a_missing_root_is_not_needed(
    db: Database, tmp_path: Path
) -> None:
    """A fresh install has no storage folder yet; the cleanup must not fail for it."""
    settings = load_settings(storage_root=tmp_path / "not-yet", upload_timeout_hours=24)
    result = cleanup.remove_orphaned_files(db.engine, now=NOW, settings=settings)
    assert result == cleanup.CleanupResult(orphaned_files_removed=0, orphaned_files_bad_keys=0)
