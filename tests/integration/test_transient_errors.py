"""Which database errors a task retries: real errors from real databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backjobs.db import is_transient_error, make_engine
from tests.support.databases import Database
from tests.support.db_errors import error_of


def test_a_refused_connection_is_transient() -> None:
    exc = error_of("postgresql://postgres@127.0.0.1:1/none", "select 1")
    assert is_transient_error(exc)


@pytest.mark.postgres
def test_a_lock_timeout_is_transient_and_bad_sql_or_data_is_not(pg_db: Database) -> None:
    blocker = pg_db.engine.connect()
    tx = blocker.begin()
    blocker.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
    try:
        locked = error_of(pg_db.url, "select * from users", setup="SET LOCAL lock_timeout = '50ms'")
    finally:
        tx.rollback()
        blocker.close()
    assert is_transient_error(locked)
    assert not is_transient_error(error_of(pg_db.url, "select * from no_such_table"))
    assert not is_transient_error(error_of(pg_db.url, "insert into users (email) values (null)"))


def test_sqlite_busy_is_transient_and_a_missing_table_is_not(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("begin immediate")
    try:
        engine = make_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
        with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
            conn.execute(text("insert into t values (1)"))
        engine.dispose()
    finally:
        holder.execute("rollback")
        holder.close()
    assert is_transient_error(raised.value)
    assert not is_transient_error(error_of(f"sqlite:///{path}", "select * from missing"))
