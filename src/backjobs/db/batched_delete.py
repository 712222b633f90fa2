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

**A short batch never ends a walk.** A row the app updates while a batch waits for its
lock gets a new address, so the batch skips it and deletes fewer rows than it picked; the
index walk goes on until the key range is exhausted (a batch *picks* fewer than
``batch_size``), then walks again from the lowest skipped key (up to ``INDEX_PASSES``
passes). The block walk goes on until the table's last block, re-reading the table's size
at the end. An updated row that moved to a page the block walk already passed is left for
the next run, which is also what happens to rows that expire meanwhile.
On PostgreSQL each batch is one statement in autocommit mode (one transaction, one round
trip), committed without waiting for the WAL flush (``synchronous_commit = off``): a batch
lost in a crash is deleted again by the next run.

:func:`iter_delete_where` is the third walk, for conditions that are not "one column before
X" (a status filter, a computed timestamp): it walks the primary key, one pass per run
(linear in the table, whatever matches). Each batch takes the next ``batch_size`` matching
rows in id order and deletes them with the condition checked again, so a row that another
transaction changed in between (an outbox row retried back to ``pending``) is kept.
On PostgreSQL a batch is one autocommitted statement, ``DELETE … WHERE ctid =
ANY(ARRAY(SELECT ctid … ORDER BY id LIMIT n)) AND <condition> RETURNING id`` (a row
updated meanwhile has a new ctid and fails the recheck): binding the batch's ids as
parameters cost more than the delete, and ``FOR UPDATE`` doubled it. A batch that the
recheck shortened ends the walk; the next run goes on from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

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

INDEX_PASSES = 3
"""Passes of the index walk over rows it picked but could not delete (updated meanwhile)."""


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
    if engine.dialect.name == "postgresql":
        yield from _walk_index_pg(engine, table.name, key, before, batch_size)
        return
    # SQLite: one writer at a time, so a batch deletes every row it picked.
    lower: datetime | None = None
    while True:
        with engine.begin() as conn:
            count, lower = _index_batch(conn, table, key, before, lower, batch_size)
        if count:
            yield count
        if count < batch_size:
            return


def _walk_index_pg(
    engine: Engine, table: str, key: str, before: datetime, batch_size: int
) -> Iterator[int]:
    """Walk the key range to its end: a batch that deletes fewer rows than it picked (a row
    updated meanwhile, so its picked address is stale) says nothing about the rest.

    Rows picked but not deleted are picked again by another pass from the lowest such key
    (up to ``INDEX_PASSES`` passes; what is still left then waits for the next run).
    """
    start: datetime | None = None
    with _autocommit_pg(engine) as conn:
        for _ in range(INDEX_PASSES):
            missed_from: datetime | None = None
            lower, strict = start, False
            while True:
                batch = _index_batch_pg(conn, table, key, before, lower, strict, batch_size)
                if batch.deleted:
                    yield batch.deleted
                if batch.deleted < batch.picked and batch.lowest is not None:
                    missed_from = min(missed_from or batch.lowest, batch.lowest)
                if batch.picked < batch_size:
                    break  # the key range is exhausted
                # A whole batch of one key value, none deletable: step past it this pass.
                strict = batch.deleted == 0 and batch.highest == lower
                lower = batch.highest
            if missed_from is None:
                return
            start = missed_from


def _index_batch(
    conn: Connection, table: Any, key: str, before: datetime, lower: datetime | None, n: int
) -> tuple[int, datetime | None]:
    key_col = table.c[key]
    condition = key_col < before if lower is None else (key_col < before) & (key_col >= lower)
    batch = select(table.c.id).where(condition).order_by(key_col).limit(n)
    deleted = conn.execute(delete(table).where(table.c.id.in_(batch)).returning(key_col))
    keys = deleted.scalars().all()
    return len(keys), max(keys, default=None)


class IndexBatch(NamedTuple):
    deleted: int
    picked: int
    lowest: datetime | None
    highest: datetime | None


def _index_batch_pg(
    conn: Connection,
    table: str,
    key: str,
    before: datetime,
    lower: datetime | None,
    strict: bool,
    n: int,
) -> IndexBatch:
    floor = "" if lower is None else f"AND {key} {'>' if strict else '>='} :lower"
    statement = text(
        f"WITH picked AS MATERIALIZED (SELECT ctid, {key} AS k FROM {table} "
        f"WHERE {key} < :before {floor} ORDER BY {key} LIMIT :n), "
        f"gone AS (DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked)) "
        f"RETURNING 1) "
        f"SELECT (SELECT count(*) FROM gone), count(*), min(k), max(k) FROM picked"
    )
    row = conn.execute(statement, {"before": before, "lower": lower, "n": n}).one()
    return IndexBatch(int(row[0]), int(row[1]), row[2], row[3])


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
