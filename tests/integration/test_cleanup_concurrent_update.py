"""Token cleanup on PostgreSQL while the app updates an expired row and holds its lock.

The app's update gives the row a new physical address; the batch that picked the old one
waits for the lock, then skips the row. That batch deletes fewer rows than it picked,
which must not end the walk (it used to: 499 of 3,000 deleted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from backjobs.db import make_engine
from backjobs.jobs import cleanup
from backjobs.models import User
from backjobs.settings import load_settings
from tests.support.databases import Database

NOW = datetime(2030, 1, 1, tzinfo=UTC)
HOLD_SECONDS = 1.0


def _seed(db: Database, *, total: int, expired: int) -> int:
    """``total`` tokens, the first ``expired`` of them (by id and by expiry) expired."""
    with db.session() as s:
        user = User(email="owner@example.com")
        s.add(user)
        s.commit()
        uid = user.id
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO refresh_tokens (user_id, token_hash, expires_at, created_at) "
                "SELECT :uid, md5(i::text), CASE WHEN i <= :expired "
                "THEN :now - make_interval(secs => :expired + 1 - i) "
                "ELSE :now + make_interval(days => 1 + i % 30) END, :now - interval '60 days' "
                "FROM generate_series(1, :total) AS i ORDER BY i"
            ),
            {"uid": uid, "expired": expired, "total": total, "now": NOW},
        )
        conn.execute(text("ANALYZE refresh_tokens"))
        first: int = conn.scalar(text("SELECT min(id) FROM refresh_tokens"))
    return first


@pytest.fixture
def app_connection(pg_db: Database) -> Iterator[Engine]:
    engine = make_engine(pg_db.url)
    yield engine
    engine.dispose()


def _app_updates_and_holds(engine: Engine, token_id: int, locked: threading.Event) -> None:
    """The app revokes a token in a transaction it keeps open for a while, then commits."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE refresh_tokens SET revoked_at = :t WHERE id = :id"),
            {"t": NOW - timedelta(hours=1), "id": token_id},
        )
        locked.set()
        time.sleep(HOLD_SECONDS)


def _cleanup_during_update(
    db: Database, app: Engine, token_id: int, batch_size: int
) -> tuple[int | None, float]:
    locked = threading.Event()
    app_thread = threading.Thread(target=_app_updates_and_holds, args=(app, token_id, locked))
    app_thread.start()
    assert locked.wait(10)
    started = time.monotonic()
    try:
        settings = load_settings(delete_batch_size=batch_size)
        result = cleanup.delete_expired_refresh_tokens(db.engine, now=NOW, settings=settings)
    finally:
        app_thread.join()
    return result.refresh_tokens_deleted, time.monotonic() - started


def _expired_left(db: Database) -> int:
    with db.engine.connect() as conn:
        left: int = conn.scalar(
            text("SELECT count(*) FROM refresh_tokens WHERE expires_at < :now"), {"now": NOW}
        )
    return left


@pytest.mark.postgres
def test_the_index_walk_goes_on_past_a_row_updated_meanwhile(
    pg_db: Database, app_connection: Engine
) -> None:
    first = _seed(pg_db, total=60_000, expired=3_000)  # 5 %: the index walk
    deleted, waited = _cleanup_during_update(pg_db, app_connection, first, batch_size=500)
    assert waited >= HOLD_SECONDS * 0.8, "the cleanup should have waited for the app's lock"
    assert _expired_left(pg_db) == 0
    assert deleted == 3_000
    with pg_db.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM refresh_tokens")) == 57_000


@pytest.mark.postgres
def test_the_block_walk_goes_on_past_a_row_updated_meanwhile(
    pg_db: Database, app_connection: Engine
) -> None:
    first = _seed(pg_db, total=30_000, expired=6_000)  # 20 %: the block walk
    deleted, waited = _cleanup_during_update(pg_db, app_connection, first, batch_size=500)
    assert waited >= HOLD_SECONDS * 0.8, "the cleanup should have waited for the app's lock"
    assert _expired_left(pg_db) == 0
    assert deleted == 6_000
