"""ProcessRecurringTransactionsJob's domain on real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from backjobs.jobs.recurring_transactions import process_recurring_transactions
from backjobs.models import RecurringTransaction, Transaction, User
from backjobs.settings import load_settings
from tests.support.databases import Database

D = date.fromisoformat


def _user(db: Database) -> int:
    with db.session() as s, s.begin():
        user = User(email=f"u{os.urandom(4).hex()}@example.com")
        s.add(user)
        s.flush()
        return user.id


def _define(db: Database, **values: Any) -> int:
    """Insert one definition (monthly, 10.0000 EUR from 2024-01-31 unless overridden)."""
    row: dict[str, Any] = {
        "owner_id": values.pop("owner_id", None) or _user(db),
        "amount": Decimal("10.0000"),
        "currency": "EUR",
        "description": "rent",
        "frequency": "monthly",
        "interval": 1,
        "start_date": D("2024-01-31"),
    }
    row.update(values)
    with db.session() as s, s.begin():
        definition = RecurringTransaction(**row)
        s.add(definition)
        s.flush()
        return definition.id


def _days(db: Database, definition_id: int) -> list[str]:
    with db.session() as s:
        query = (
            select(Transaction.occurred_on)
            .where(Transaction.recurring_transaction_id == definition_id)
            .order_by(Transaction.occurred_on)
        )
        return [d.isoformat() for d in s.scalars(query)]


def _last_processed(db: Database, definition_id: int) -> date | None:
    with db.session() as s:
        # The column alone: a row with a malformed amount cannot be loaded whole.
        query = select(RecurringTransaction.last_processed_date).where(
            RecurringTransaction.id == definition_id
        )
        return s.execute(query).scalar_one()


def _count(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Transaction)) or 0


def _run(db: Database, as_of: str, *, batch_size: int = 5000) -> Any:
    when = datetime.fromisoformat(as_of).replace(tzinfo=UTC)
    settings = load_settings(recurring_batch_size=batch_size)
    return process_recurring_transactions(db.engine, now=when, settings=settings)


def test_catch_up_copies_the_definition_and_a_rerun_creates_nothing(db: Database) -> None:
    owner = _user(db)
    rid = _define(
        db, owner_id=owner, amount=Decimal("-1234.5678"), currency="USD", description="Miete"
    )
    result = _run(db, "2024-06-15T00:05:00")
    assert _days(db, rid) == ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31"]
    assert (result.definitions_processed, result.transactions_created, result.invalid) == (1, 5, 0)
    assert result.through == "2024-06-15"
    assert _last_processed(db, rid) == D("2024-06-15")
    with db.session() as s:
        rows = s.scalars(select(Transaction)).all()
    assert {(t.owner_id, t.amount, t.currency, t.description) for t in rows} == {
        (owner, Decimal("-1234.5678"), "USD", "Miete")
    }
    again = _run(db, "2024-06-15T23:59:00")
    assert (again.definitions_processed, again.transactions_created) == (0, 0)
    assert _run(db, "2024-07-01T00:05:00").transactions_created == 1
    assert _days(db, rid)[-1] == "2024-06-30"


def test_the_done_when_edge_cases_through_2028_03_01(db: Database) -> None:
    monthly = _define(db, start_date=D("2024-01-31"))
    yearly = _define(db, frequency="yearly", start_date=D("2024-02-29"))
    weekly = _define(db, frequency="weekly", interval=2, start_date=D("2028-01-03"))
    ended = _define(db, start_date=D("2027-10-31"), end_date=D("2027-12-31"))
    result = _run(db, "2028-03-01T00:05:00")
    assert _days(db, yearly) == [
        "2024-02-29", "2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29"
    ]  # fmt: skip
    months = _days(db, monthly)
    assert len(months) == 50
    assert months[:3] == ["2024-01-31", "2024-02-29", "2024-03-31"]
    assert months[12:14] == ["2025-01-31", "2025-02-28"]
    assert months[-1] == "2028-02-29"
    assert _days(db, weekly) == [
        "2028-01-03",
        "2028-01-17",
        "2028-01-31",
        "2028-02-14",
        "2028-02-28",
    ]
    assert _days(db, ended) == ["2027-10-31", "2027-11-30", "2027-12-31"]
    assert result.transactions_created == 50 + 5 + 5 + 3
    assert _run(db, "2028-03-01T00:05:00").transactions_created == 0
    assert _count(db) == 63


def test_an_ended_definition_stops_and_catches_up_when_its_end_is_extended(db: Database) -> None:
    rid = _define(db, start_date=D("2024-01-15"), end_date=D("2024-03-15"))
    assert _run(db, "2024-06-01T00:00:00").transactions_created == 3
    assert _last_processed(db, rid) == D("2024-03-15")
    assert _run(db, "2024-07-01T00:00:00").definitions_processed == 0
    with db.session() as s, s.begin():
        s.execute(
            update(RecurringTransaction)
            .where(RecurringTransaction.id == rid)
            .values(end_date=D("2024-12-31"))
        )
    assert _run(db, "2024-07-01T00:00:00").transactions_created == 3  # Apr, May, Jun 15
    assert _days(db, rid)[-1] == "2024-06-15"


def test_disabled_is_skipped_and_catches_up_from_last_processed_when_re_enabled(
    db: Database,
) -> None:
    rid = _define(db, start_date=D("2024-01-10"), last_processed_date=D("2024-02-10"))
    with db.session() as s, s.begin():
        s.execute(update(RecurringTransaction).values(enabled=False))
    assert _run(db, "2024-05-20T00:00:00").definitions_processed == 0
    assert _days(db, rid) == []
    assert _last_processed(db, rid) == D("2024-02-10")
    with db.session() as s, s.begin():
        s.execute(update(RecurringTransaction).values(enabled=True))
    assert _run(db, "2024-05-20T00:00:00").transactions_created == 3
    assert _days(db, rid) == ["2024-03-10", "2024-04-10", "2024-05-10"]


def test_a_run_for_an_older_as_of_creates_nothing_and_never_moves_back(db: Database) -> None:
    rid = _define(db, frequency="weekly", start_date=D("2024-01-01"))
    assert _run(db, "2024-03-01T00:00:00").transactions_created == 9
    assert _run(db, "2024-02-01T00:00:00").transactions_created == 0
    assert _last_processed(db, rid) == D("2024-03-01")


def test_an_existing_row_for_an_occurrence_is_not_duplicated(db: Database) -> None:
    rid = _define(db, start_date=D("2024-01-31"))
    with db.session() as s, s.begin():
        owner = s.get_one(RecurringTransaction, rid).owner_id
        s.add(
            Transaction(
                owner_id=owner,
                amount=Decimal(1),
                currency="EUR",
                occurred_on=D("2024-02-29"),
                recurring_transaction_id=rid,
            )
        )
    assert _run(db, "2024-03-31T00:00:00").transactions_created == 2
    assert _days(db, rid) == ["2024-01-31", "2024-02-29", "2024-03-31"]


def test_a_future_start_is_left_alone(db: Database) -> None:
    rid = _define(db, start_date=D("2030-01-01"))
    assert _run(db, "2029-12-31T23:59:59").definitions_processed == 0
    assert _last_processed(db, rid) is None


def test_invalid_definitions_are_skipped_counted_and_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    good = _define(db, start_date=D("2024-03-01"))
    bad = {
        _define(db, frequency="daily"): "unknown frequency 'daily'",
        _define(db, interval=0): "interval 0 is below 1",
        _define(db, end_date=D("2024-01-01")): "is before start_date",
        _define(db, amount=Decimal("NaN")): "is not a finite number",
    }
    if not db.is_postgres:  # numeric(19,4) on PostgreSQL cannot hold these at all
        bad[_define(db, amount=Decimal("-Infinity"))] = "is not a finite number"
        garbage = _define(db)
        with db.session() as s, s.begin():
            s.execute(
                text("UPDATE recurring_transactions SET amount = 'abc' WHERE id = :id"),
                {"id": garbage},
            )
        bad[garbage] = "amount 'abc' is not a number"
    with caplog.at_level(logging.WARNING, logger="backjobs.jobs.recurring_transactions"):
        result = _run(db, "2024-04-01T00:05:00")
    assert (result.definitions_processed, result.transactions_created) == (1, 2)
    assert (result.invalid, sorted(result.invalid_ids)) == (len(bad), sorted(bad))
    assert _days(db, good) == ["2024-03-01", "2024-04-01"]
    messages = [r.getMessage() for r in caplog.records]
    for rid, reason in bad.items():
        assert _days(db, rid) == []
        assert _last_processed(db, rid) is None
        assert any(f"recurring transaction {rid}:" in m and reason in m for m in messages)


def test_small_batches_process_every_definition(db: Database) -> None:
    owner = _user(db)
    ids = [_define(db, owner_id=owner, start_date=D("2024-01-05")) for _ in range(7)]
    result = _run(db, "2024-03-05T00:00:00", batch_size=3)
    assert (result.definitions_processed, result.transactions_created) == (7, 21)
    assert all(len(_days(db, rid)) == 3 for rid in ids)


def test_long_catch_ups_are_written_in_chunks(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("backjobs.jobs.recurring_transactions.CHUNK_ROWS", 100)
    rid = _define(db, frequency="weekly", start_date=D("2000-01-03"))
    result = _run(db, "2024-01-01T00:00:00")
    assert result.transactions_created == len(_days(db, rid)) == 1253


RUN_ONE = """
import json, sys, time
from datetime import date
from backjobs.db import make_engine
from backjobs.jobs.recurring_transactions import process_recurring_transactions
from backjobs.settings import load_settings
engine = make_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start at the same instant
began = time.time()
settings = load_settings(recurring_batch_size=20)
r = process_recurring_transactions(engine, now=date(2024, 6, 1), settings=settings)
print(json.dumps([r.definitions_processed, r.transactions_created, began, time.time()]))
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_two_processes_at_once_create_each_row_once(pg_db: Database) -> None:
    owner = _user(pg_db)
    with pg_db.session() as s, s.begin():
        s.execute(
            text(
                "INSERT INTO recurring_transactions (owner_id, amount, currency, frequency,"
                " start_date) SELECT :owner, 1.5, 'EUR', 'weekly', DATE '2024-01-01' + (n % 7)"
                " FROM generate_series(1, 2000) AS n"
            ),
            {"owner": owner},
        )
    cmd = [sys.executable, "-c", RUN_ONE, pg_db.url, str(time.time() + 3)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    figures = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert max(f[2] for f in figures) < min(f[3] for f in figures), "the runs did not overlap"
    expected = _expected_weekly_rows()
    # Each definition was claimed by exactly one process: no work done twice.
    assert sum(f[0] for f in figures) == 2000
    assert sum(f[1] for f in figures) == expected == _count(pg_db)
    with pg_db.session() as s:
        dupes = s.execute(
            select(Transaction.recurring_transaction_id, Transaction.occurred_on)
            .group_by(Transaction.recurring_transaction_id, Transaction.occurred_on)
            .having(func.count() > 1)
        ).all()
    assert dupes == []


def _expected_weekly_rows() -> int:
    # 2000 weekly definitions starting on 2024-01-01 + (n % 7), through 2024-06-01.
    total = 0
    for n in range(1, 2001):
        start = date.fromordinal(D("2024-01-01").toordinal() + n % 7)
        total += (D("2024-06-01") - start).days // 7 + 1
    return total
