"""ProcessRecurringTransactionsJob's domain: turn due recurring definitions into transactions.

For every **enabled** definition, one ``transactions`` row per occurrence (see
:mod:`backjobs.jobs.recurrence`) after ``last_processed_date`` (from ``start_date`` when it is
null) up to the as_of date, copying owner, amount, currency and description;
``last_processed_date`` then moves to the as_of date (or to ``end_date`` once that has
passed, so a later extension of ``end_date`` still catches up). Missed days are caught
up by the next run. A disabled definition is skipped and its ``last_processed_date``
stays where it was: **when it is re-enabled, the next run creates every occurrence since
then**, including those of the disabled period (to skip them, the app sets
``last_processed_date`` when it re-enables the definition).

Exactly once: the rows of a definition and the advance of its ``last_processed_date`` are
committed in one transaction; ``last_processed_date`` only ever moves forward, and rows
are created only for the definitions whose advance took effect (the advance is the
claim: a run that finds it already done creates nothing); inserts are ``ON CONFLICT DO
NOTHING`` against the unique (recurring_transaction_id, occurred_on) as the last line of
defence. On PostgreSQL each batch is also claimed ``FOR UPDATE SKIP LOCKED``, so two
concurrent runs split the work instead of queueing behind each other; SQLite serialises
writers (every batch transaction starts ``BEGIN IMMEDIATE``). A re-run for an older as_of
finds nothing due before its date and never moves ``last_processed_date`` back.

Set-based: definitions are read in keyset batches by id, **each batch its own
transaction** (this module commits: batching is the point; a failure loses at most the
batch in flight, and a retry or the next run picks it up). Occurrences are computed in
Python; on PostgreSQL one statement per group of up to ``CHUNK_ROWS`` rows advances the
definitions (``UPDATE ... RETURNING``) and inserts their rows from what it returns; on
SQLite an ``UPDATE ... FROM json_each`` and an ``INSERT ... SELECT`` do the same. Amounts
are copied by the database, exactly, and never pass through Python or floats.

Invalid definitions (unknown frequency, interval below 1, end before start, an amount that
is not a finite number) are skipped with a warning naming the id and the reason; nothing
is written for them and they are reported again on every run until fixed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

from sqlalchemy import Engine, String, cast, or_, select, text
from sqlalchemy.orm import Session

from backjobs.db import is_postgres, session_scope
from backjobs.jobs.recurrence import Rule, iter_occurrences, problem
from backjobs.models import RecurringTransaction as RT
from backjobs.settings import Settings

log = logging.getLogger(__name__)

# Occurrences buffered before a group is written: bounds memory when a batch catches up
# years (one definition alone may exceed it: weekly since year 1 is about 105,000 rows).
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class RecurringTransactionsResult:
    """What a run did: the date it processed through, and counts."""

    through: str
    definitions_processed: int = 0
    transactions_created: int = 0
    invalid: int = 0
    invalid_ids: tuple[int, ...] = ()


@dataclass
class _Batch:
    last_id: int = 0
    scanned: int = 0
    processed: int = 0
    created: int = 0
    invalid_ids: list[int] = field(default_factory=list)


def process_recurring_transactions(
    engine: Engine, *, now: datetime | date, settings: Settings
) -> RecurringTransactionsResult:
    """Create the transactions of every enabled definition due up to ``now``'s date.

    ``now`` is an aware datetime (its UTC date is used) or a date. Commits batch by batch
    of ``BACKJOBS_RECURRING_BATCH_SIZE`` definitions.
    """
    through = now.astimezone(UTC).date() if isinstance(now, datetime) else now
    batch_size = settings.recurring_batch_size
    processed = created = 0
    invalid: list[int] = []
    after = 0
    while True:
        with session_scope(engine) as session:
            batch = process_batch(session, after_id=after, through=through, limit=batch_size)
        processed += batch.processed
        created += batch.created
        invalid.extend(batch.invalid_ids)
        if batch.scanned < batch_size:
            break
        after = batch.last_id
    log.info(
        "Recurring transactions through %s: %d definitions processed, %d transactions "
        "created, %d invalid",
        through,
        processed,
        created,
        len(invalid),
    )
    return RecurringTransactionsResult(
        through.isoformat(), processed, created, len(invalid), tuple(invalid)
    )


class DueDefinition(NamedTuple):
    """A due definition's schedule as stored (unchecked: SQLite's types are loose)."""

    id: int
    frequency: str
    interval: int
    start_date: date
    end_date: date | None
    last_processed_date: date | None
    amount: str | None


def due_definitions(
    session: Session, *, after_id: int, through: date, limit: int
) -> list[DueDefinition]:
    """The next ``limit`` due definitions with id above ``after_id``, claimed on PostgreSQL."""
    query = (
        select(
            RT.id,
            RT.frequency,
            RT.interval,
            RT.start_date,
            RT.end_date,
            RT.last_processed_date,
            # As text: a malformed amount is reported, not a crash of the whole batch.
            cast(RT.amount, String).label("amount"),
        )
        .where(
            RT.id > after_id,
            RT.enabled.is_(True),
            RT.start_date <= through,
            or_(RT.last_processed_date.is_(None), RT.last_processed_date < through),
            # Past its end and fully processed: nothing left to do.
            or_(
                RT.end_date.is_(None),
                RT.last_processed_date.is_(None),
                RT.last_processed_date < RT.end_date,
            ),
        )
        .order_by(RT.id)
        .limit(limit)
    )
    if is_postgres(session):
        # Another run holding a definition is processing it: skip, do not wait or redo.
        query = query.with_for_update(skip_locked=True, of=RT)
    # Core, not ORM, execution, and named tuples: attribute access on SQLAlchemy rows
    # would cost more than the date arithmetic.
    make = DueDefinition._make
    return [make(row) for row in session.connection().execute(query)]


def process_batch(session: Session, *, after_id: int, through: date, limit: int) -> _Batch:
    """Process one keyset batch inside the caller's transaction (the caller commits)."""
    rows = due_definitions(session, after_id=after_id, through=through, limit=limit)
    batch = _Batch(last_id=rows[-1].id if rows else after_id, scanned=len(rows))
    plans: list[_Plan] = []
    for row in rows:
        rule = Rule(row.frequency, row.interval, row.start_date, row.end_date)
        reason = problem(rule) or _amount_problem(row.amount)
        if reason is not None:
            log.warning("Skipping recurring transaction %s: %s", row.id, reason)
            batch.invalid_ids.append(row.id)
            continue
        last, end = row.last_processed_date, row.end_date
        first = last + timedelta(days=1) if last is not None else row.start_date
        plans.append(_Plan(row.id, rule, first, min(through, end or through)))
    for group in _groups(plans):
        processed, created = write_group(session, group)
        batch.processed += processed
        batch.created += created
    return batch


@dataclass(frozen=True, slots=True)
class _Plan:
    id: int
    rule: Rule
    first: date  # the first day not processed yet
    advance_to: date  # the new last_processed_date


@dataclass
class Group:
    """Definitions to advance (id, new last_processed_date) and rows to create (id, day)."""

    advances: list[tuple[int, date]] = field(default_factory=list)
    occurrences: list[tuple[int, date]] = field(default_factory=list)


def _groups(plans: Iterable[_Plan]) -> Iterator[Group]:
    # Up to CHUNK_ROWS occurrences a group (more only for one definition that alone has more).
    group = Group()
    for plan in plans:
        group.advances.append((plan.id, plan.advance_to))
        days = iter_occurrences(plan.rule, first=plan.first, last=plan.advance_to)
        group.occurrences.extend((plan.id, day) for day in days)
        if len(group.occurrences) >= CHUNK_ROWS:
            yield group
            group = Group()
    if group.advances:
        yield group


# PostgreSQL, one statement a group: advance last_processed_date where it is still behind
# (the claim: a concurrent run that got there first makes it a no-op), then create the
# rows of exactly the definitions advanced, from the values the UPDATE returns. Pairs
# travel as comma-separated text, which psycopg sends far faster than typed arrays.
_PG_WRITE = text("""
    WITH adv AS (
        UPDATE recurring_transactions AS r SET last_processed_date = a.day
        FROM unnest(CAST(string_to_array(:adv_ids, ',') AS bigint[]),
                    CAST(string_to_array(:adv_days, ',') AS date[])) AS a(id, day)
        WHERE r.id = a.id AND (r.last_processed_date IS NULL OR r.last_processed_date < a.day)
          -- the group's id range: an index range scan, not a scan of the whole table
          AND r.id BETWEEN :lo AND :hi
        RETURNING r.id, r.owner_id, r.amount, r.currency, r.description
    ), ins AS (
        INSERT INTO transactions
            (owner_id, amount, currency, description, occurred_on, recurring_transaction_id)
        SELECT adv.owner_id, adv.amount, adv.currency, adv.description, o.day, adv.id
        FROM unnest(CAST(string_to_array(:occ_ids, ',') AS bigint[]),
                    CAST(string_to_array(:occ_days, ',') AS date[])) AS o(id, day)
        JOIN adv ON adv.id = o.id
        ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM adv), (SELECT count(*) FROM ins)
""")
# SQLite (writers serialised by BEGIN IMMEDIATE): pairs travel as a JSON array of
# [id, "YYYY-MM-DD"] (SQLite's date format); amounts are copied by the database.
_LITE_ADVANCE = text("""
    UPDATE recurring_transactions SET last_processed_date = json_extract(v.value, '$[1]')
    FROM json_each(:pairs) AS v
    WHERE recurring_transactions.id = json_extract(v.value, '$[0]')
      AND (last_processed_date IS NULL OR last_processed_date < json_extract(v.value, '$[1]'))
""")
_LITE_INSERT = text("""
    INSERT INTO transactions
        (owner_id, amount, currency, description, occurred_on, recurring_transaction_id)
    SELECT r.owner_id, r.amount, r.currency, r.description, json_extract(v.value, '$[1]'), r.id
    FROM json_each(:pairs) AS v
    JOIN recurring_transactions AS r ON r.id = json_extract(v.value, '$[0]')
    WHERE true  -- lets the parser read ON CONFLICT as the upsert clause, not a join
    ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
""")


def write_group(session: Session, group: Group) -> tuple[int, int]:
    """Advance and insert one group; returns (definitions advanced, transactions created)."""
    conn = session.connection()
    if is_postgres(session):
        params = {
            "lo": group.advances[0][0],
            "hi": group.advances[-1][0],
            "adv_ids": ",".join(str(i) for i, _ in group.advances),
            "adv_days": ",".join(d.isoformat() for _, d in group.advances),
            "occ_ids": ",".join(str(i) for i, _ in group.occurrences),
            "occ_days": ",".join(d.isoformat() for _, d in group.occurrences),
        }
        processed, created = conn.execute(_PG_WRITE, params).one()
        return int(processed), int(created)
    advanced = conn.execute(_LITE_ADVANCE, {"pairs": _json_pairs(group.advances)})
    inserted = conn.execute(_LITE_INSERT, {"pairs": _json_pairs(group.occurrences)})
    return int(advanced.rowcount), int(inserted.rowcount)


def _json_pairs(pairs: Sequence[tuple[int, date]]) -> str:
    return json.dumps([[i, d.isoformat()] for i, d in pairs])


def _amount_problem(amount: str | None) -> str | None:
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        return f"amount {amount!r} is not a number"
    if not value.is_finite():
        return f"amount {amount} is not a finite number"
    return None
