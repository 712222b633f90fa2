"""Rows a test starts from, written through the models as the app would."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from backjobs.models import AppTask, Marker, RecurringTransaction, RefreshToken, StoredFile, User
from tests.support.databases import Database
from tests.support.files import make_unremovable

CLEANUP_AS_OF = datetime(2030, 1, 1, tzinfo=UTC)


def seed_cleanup(db: Database, storage_root: Path, *, stuck: bool = False) -> None:
    """Two rows to delete and one to keep in each table."""
    (storage_root / "up").mkdir(parents=True, exist_ok=True)
    for name in ("old-a", "old-b", "new"):
        (storage_root / "up" / name).write_bytes(b"x")
    with db.session() as s:
        user = User(email="owner@example.com")
        s.add(user)
        s.flush()
        old, new = CLEANUP_AS_OF - timedelta(days=40), CLEANUP_AS_OF - timedelta(hours=1)
        s.add_all(
            [
                RefreshToken(user_id=user.id, token_hash=f"t{i}", expires_at=t)
                for i, t in enumerate([old, new, CLEANUP_AS_OF + timedelta(days=1)])
            ]
        )
        s.add_all(
            [
                Marker(owner_id=user.id, title=f"m{i}", deleted_at=t)
                for i, t in enumerate([old, old, new])
            ]
        )
        s.add_all(_outbox_rows(old, new))
        s.add_all(
            [
                StoredFile(owner_id=user.id, storage_key=f"up/{k}", created_at=t)
                for k, t in [("old-a", old), ("old-b", old), ("new", new)]
            ]
        )
        if stuck:  # an object that cannot be removed (a folder of its own: see files.py)
            (storage_root / "locked").mkdir()
            (storage_root / "locked" / "stuck").write_bytes(b"x")
            make_unremovable(storage_root / "locked" / "stuck")
            s.add(StoredFile(owner_id=user.id, storage_key="locked/stuck", created_at=old))
        s.commit()


def _outbox_rows(old: datetime, new: datetime) -> list[AppTask]:
    """Two ended rows past the outbox retention; a recent one and an old pending one stay."""
    rows = [("completed", old), ("failed", old), ("completed", new), ("pending", None)]
    return [
        AppTask(
            task_type="email_send",
            status=status,
            payload={},
            created_at=old,
            next_attempt_at=old,
            completed_at=completed,
        )
        for status, completed in rows
    ]


def outbox_rows(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(AppTask)) or 0


def cleanup_counts(db: Database) -> tuple[int, int, int]:
    with db.session() as s:
        return tuple(  # type: ignore[return-value]
            s.scalar(select(func.count()).select_from(m))
            for m in (RefreshToken, Marker, StoredFile)
        )


def seed_invalid_recurring(db: Database, *, amount: str = "1.0000") -> None:
    """A user with one recurring definition the job must skip (interval 0) and log."""
    with db.session() as s:
        user = User(email="payer@example.com")
        s.add(user)
        s.flush()
        s.add(
            RecurringTransaction(
                owner_id=user.id,
                amount=Decimal(amount),
                currency="EUR",
                frequency="monthly",
                interval=0,
                start_date=date(2026, 1, 1),
            )
        )
        s.commit()
