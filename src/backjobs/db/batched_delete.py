"""Delete "rows whose timestamp is before X" in batches, each batch its own transaction.

Two walks, each linear in the work however many rows match:

- **by index** (SQLite; PostgreSQL when few rows match): each batch takes the next
  ``batch_size`` rows in the timestamp's index order, starting where the last batch
  ended. On PostgreSQL the batch deletes by physical address (``ctid = ANY(ARRAY(...))``,
  a TID scan): ``id IN (subquery)`` makes the planner hash-join against a scan of the
  whole table on every batch.
- **by block range** (PostgreSQL when a large share of the table matches, the
  million-expired-tokens case): each batch deletes the matching rows in the next range of
  heap pages, sized from the table's rows per page to hold about ``batch_size`` rows.
  That is the plain ``DELETE``'s sequential scan cut into short transactions.

A row that the app updates during the walk may move to a page already passed; it is then
left for the next run, which is also what happens to rows that expire meanwhile.

:func:`iter_delete_where` is the third walk, for conditions that are not "one column before
X" (a status filter, a computed timestamp): it walks the primary key, one pass per run
(linear in the table, whatever matches). Each batch takes the next ``batch_size`` matching
rows in id order and deletes them with the condition checked again, so a row that another
transaction changed in between (an outbox row retried back to ``pending``) is kept.
On PostgreSQL a batch is one autocommitted statement, ``DELETE … WHERE ctid =
ANY(ARRAY(SELECT ctid … ORDER BY id LIMIT n)) AND <condition> RETURNING id`` (a row
updated meanwhile has a new ctid and fails the recheck): binding the batch's ids as
parameters cost more than the delete, and ``FOR UPDATE`` doubled it.
On PostgreSQL each batch is one statement in autocommit mode (one transaction, one round
trip), committed without waiting for the WAL flush (``synchronous_commit = off``): a batch
lost in a crash is deleted again by the next run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    any_,
    delete,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.selectable import Select

BLOCK_WALK_SHARE = 0.1
"""Walk by block range when at least this share of the table matches."""


def iter_delete_batches(
    engine: Engine,
    column: InstrumentedAttribute[datetime | None] | InstrumentedAttribute[datetime],
    *,
    before: datetime,
    batch_size: int,
) -> Iterator[int]:
    """Delete rows whose ``column`` is before ``before``; yields each committed batch's count."""
    table = column.class_.__table__
    if engine.dialect.name == "postgresql":
        blocks, rows_per_block, share = _pg_shape(engine, table.name, column.key, before)
        if share >= BLOCK_WALK_SHARE:
            step = max(1, round(batch_size / rows_per_block))
            yield from _walk_blocks(engine, table.name, column.key, before, step, blocks)
            return
    yield from _walk_index(engine, table, column.key, before, batch_size)


def iter_delete_where(
    engine: Engine, table: Table, where: ColumnElement[bool], *, batch_size: int
) -> Iterator[int]:
    """Delete ``table``'s rows matching ``where``, walking ``id``; yields each batch's count."""
    after: int | None = None
    if engine.dialect.name == "postgresql":
        ctid: ColumnElement[Any] = literal_column("ctid")
        with _autocommit_pg(engine) as conn:
            while True:
                batch = _next_batch(table, ctid, where, after, batch_size).scalar_subquery()
                statement = delete(table).where(ctid == any_(func.array(batch)), where)
                ids = list(conn.scalars(statement.returning(table.c.id)))
                if ids:
                    yield len(ids)
                if len(ids) < batch_size:
                    return
                after = max(ids)
    while True:
        with engine.begin() as conn:
            ids = list(conn.scalars(_next_batch(table, table.c.id, where, after, batch_size)))
            count = conn.execute(delete(table).where(table.c.id.in_(ids), where)).rowcount
        if count:
            yield count
        if len(ids) < batch_size:
            return
        after = ids[-1]


def _next_batch(
    table: Table, key: ColumnElement[Any], where: ColumnElement[bool], after: int | None, n: int
) -> Select[tuple[Any]]:
    query = select(key).select_from(table).where(where).order_by(table.c.id).limit(n)
    return query if after is None else query.where(table.c.id > after)


def _walk_index(
    engine: Engine, table: Any, key: str, before: datetime, batch_size: int
) -> Iterator[int]:
    lower: datetime | None = None
    if engine.dialect.name == "postgresql":
        with _autocommit_pg(engine) as conn:
            while True:
                count, lower = _index_batch_pg(conn, table.name, key, before, lower, batch_size)
                if count:
                    yield count
                if count < batch_size:
                    return
    while True:
        with engine.begin() as conn:
            count, lower = _index_batch(conn, table, key, before, lower, batch_size)
        if count:
            yield count
        if count < batch_size:
            return


def _index_batch(
    conn: Connection, table: Any, key: str, before: datetime, lower: datetime | None, n: int
) -> tuple[int, datetime | None]:
    key_col = table.c[key]
    condition = key_col < before if lower is None else (key_col < before) & (key_col >= lower)
    batch = select(table.c.id).where(condition).order_by(key_col).limit(n)
    deleted = conn.execute(delete(table).where(table.c.id.in_(batch)).returning(key_col))
    keys = deleted.scalars().all()
    return len(keys), max(keys, default=None)


def _index_batch_pg(
    conn: Connection, table: str, key: str, before: datetime, lower: datetime | None, n: int
) -> tuple[int, datetime | None]:
    floor = "" if lower is None else f"AND {key} >= :lower"
    statement = text(
        f"WITH gone AS (DELETE FROM {table} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {table} WHERE {key} < :before {floor} ORDER BY {key} LIMIT :n"
        f")) RETURNING {key}) SELECT count(*), max({key}) FROM gone"
    )
    count, highest = conn.execute(statement, {"before": before, "lower": lower, "n": n}).one()
    return int(count), highest


def _walk_blocks(
    engine: Engine, table: str, key: str, before: datetime, step: int, blocks: int
) -> Iterator[int]:
    statement = text(
        f"DELETE FROM {table} WHERE ctid >= CAST(:low AS tid) AND ctid < CAST(:high AS tid) "
        f"AND {key} < :before"
    )
    start = 0
    with _autocommit_pg(engine) as conn:
        while start < blocks:
            params = {"low": f"({start},0)", "high": f"({start + step},0)", "before": before}
            count = conn.execute(statement, params).rowcount
            if count:
                yield count
            start += step
            if start >= blocks:  # the table may have grown during the walk
                blocks = _pg_blocks(engine, table)


@contextmanager
def _autocommit_pg(engine: Engine) -> Iterator[Connection]:
    """One connection where every statement is its own transaction, commits not flushed.

    A batch is a single statement, so autocommit makes it one transaction in one round
    trip. Its commit need not wait for the WAL flush: a batch lost in a crash is deleted
    again by the next run.
    """
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SET synchronous_commit = off"))
        try:
            yield conn
        finally:
            conn.execute(text("RESET synchronous_commit"))


def _pg_blocks(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        sql = "SELECT pg_relation_size(CAST(:t AS regclass)) / current_setting('block_size')::int"
        return int(conn.scalar(text(sql), {"t": table}) or 0)


def _pg_shape(engine: Engine, table: str, key: str, before: datetime) -> tuple[int, float, float]:
    """(heap blocks, rows per block, share of rows that match — counted up to the threshold)."""
    blocks = _pg_blocks(engine, table)
    with engine.connect() as conn:
        estimate = conn.scalar(
            text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": table}
        )
        rows = max(float(estimate or 0), 0.0) or float(
            conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0
        )
        cap = max(1, int(rows * BLOCK_WALK_SHARE))
        matching = conn.scalar(
            text(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {key} < :b LIMIT :cap) s"),
            {"b": before, "cap": cap},
        )
    rows_per_block = rows / blocks if blocks and rows else 100.0
    return blocks, max(rows_per_block, 1.0), (matching or 0) / max(rows, 1.0)
