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
batch in flight, and a retry or the next run picks it up). On PostgreSQL a batch is **one
statement** (:mod:`backjobs.jobs.recurring_pg`): it claims the batch, computes the
occurrences with the database's own date arithmetic (the same anchoring rules, checked
against :mod:`backjobs.jobs.recurrence` by the tests), advances the definitions and inserts
their rows. On SQLite occurrences are computed in Python and an ``UPDATE ... FROM
json_each`` and an ``INSERT ... SELECT`` write them, in groups of up to ``CHUNK_ROWS``
rows. Amounts are copied by the database, exactly, and never pass through Python or floats.

Invalid definitions (unknown frequency, an interval that is not a whole number of at least
1, a date that is not a date, end before start, an amount that is not a finite number)
are skipped with a warning naming the id and the reason; nothing is written for them and
they are reported again on every run until fixed. On SQLite, whose columns take any
value, the fragile columns are read as text and parsed here, so one malformed row cannot
stop the batch; on PostgreSQL the column types already refuse such values.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import Engine, String, cast, or_, select, text
from sqlalchemy.orm import Session

from backjobs.db import is_postgres, session_scope
from backjobs.jobs import recurring_pg
from backjobs.jobs.recurrence import Rule, iter_occurrences, problem
from backjobs.models import RecurringTransaction as RT
from backjobs.settings import Settings

log = logging.getLogger(__name__)

# SQLite: occurrences buffered before a group is written: bounds memory when a batch
# catches up years (one definition alone may exceed it: weekly since year 1 is about
# 105,000 rows).
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class RecurringTransactionsResult:
    """What a run did: the date it processed through, and counts."""

    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("invalid",)  # definitions skipped

    through: str
    definitions_processed: int = 0
    transactions_created: int = 0
    invalid: int = 0
    invalid_ids: tuple[int, ...] = ()


@dataclass
class Batch:
    """One batch's outcome: where the keyset stopped, and counts."""

    last_id: int = 0
    scanned: int = 0
    processed: int = 0
    created: int = 0
    invalid_ids: list[int] = field(default_factory=list)

    def skip(self, definition_id: int, reason: str) -> None:
        log.warning("Skipping recurring transaction %s: %s", definition_id, reason)
        self.invalid_ids.append(definition_id)


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


def process_batch(session: Session, *, after_id: int, through: date, limit: int) -> Batch:
    """Process one keyset batch inside the caller's transaction (the caller commits)."""
    if is_postgres(session):
        figures = recurring_pg.process_batch(
            session.connection(), after_id=after_id, through=through, limit=limit
        )
        batch = Batch(figures.last_id or after_id, figures.scanned, figures.processed)
        batch.created = figures.created
        for row in figures.invalid:
            batch.skip(row.id, _reason(row) or "invalid definition")
        return batch
    return _process_batch_in_python(session, after_id=after_id, through=through, limit=limit)


class DueDefinition(NamedTuple):
    """A due definition's schedule as stored (unchecked: SQLite's types are loose)."""

    id: int
    frequency: Any
    interval: Any
    start_date: Any
    end_date: Any
    last_processed_date: Any
    amount: str | None


def due_definitions(
    session: Session, *, after_id: int, through: date, limit: int
) -> list[DueDefinition]:
    """The next ``limit`` due definitions with id above ``after_id``, schedule as text.

    As text: SQLite stores whatever it is given ('two' as an interval, '2024-02-30' as a
    date), and a typed read would fail the whole batch on the first such row.
    """
    query = (
        select(
            RT.id,
            RT.frequency,
            cast(RT.interval, String).label("interval"),
            cast(RT.start_date, String).label("start_date"),
            cast(RT.end_date, String).label("end_date"),
            cast(RT.last_processed_date, String).label("last_processed_date"),
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
    make = DueDefinition._make
    return [make(row) for row in session.connection().execute(query)]


class _Invalid(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Plan:
    id: int
    rule: Rule
    first: date  # the first day not processed yet
    advance_to: date  # the new last_processed_date


def _process_batch_in_python(
    session: Session, *, after_id: int, through: date, limit: int
) -> Batch:
    rows = due_definitions(session, after_id=after_id, through=through, limit=limit)
    batch = Batch(last_id=rows[-1].id if rows else after_id, scanned=len(rows))
    plans: list[_Plan] = []
    for row in rows:
        try:
            plans.append(_plan(row, through))
        except _Invalid as bad:
            batch.skip(row.id, str(bad))
    for group in _groups(plans):
        processed, created = write_group(session, group)
        batch.processed += processed
        batch.created += created
    return batch


def _plan(row: DueDefinition, through: date) -> _Plan:
    """What to do for ``row``; raises _Invalid with the reason when it cannot be scheduled."""
    rule = Rule(
        row.frequency,
        _whole_number("interval", row.interval),
        _date("start_date", row.start_date),
        _date("end_date", row.end_date),
    )
    last = _date("last_processed_date", row.last_processed_date)
    reason = problem(rule) or _amount_problem(row.amount)
    if reason is not None or rule.start_date is None:
        raise _Invalid(reason or "start_date is missing")
    first = last + timedelta(days=1) if last is not None else rule.start_date
    return _Plan(row.id, rule, first, min(through, rule.end_date or through))


def _reason(row: Any) -> str | None:
    """Why a row (typed values, as PostgreSQL returns them) is invalid, or None."""
    try:
        _plan(DueDefinition(row.id, row.frequency, row.interval, row.start_date,
                            row.end_date, None, row.amount), date.max)  # fmt: skip
    except _Invalid as bad:
        return str(bad)
    return None


_WHOLE = re.compile(r"[+-]?\d+")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        return int(value)
    raise _Invalid(f"{name} {value!r} is not a whole number")


def _date(name: str, value: object) -> Any:
    if value is None or isinstance(value, date):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise _Invalid(f"{name} {value!r} is not a valid date")


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
    """Advance and insert one group (SQLite); returns (definitions advanced, rows created)."""
    conn = session.connection()
    advanced = conn.execute(_LITE_ADVANCE, {"pairs": _json_pairs(group.advances)})
    inserted = conn.execute(_LITE_INSERT, {"pairs": _json_pairs(group.occurrences)})
    return int(advanced.rowcount), int(inserted.rowcount)


def _json_pairs(pairs: Sequence[tuple[int, date]]) -> str:
    return json.dumps([[i, d.isoformat()] for i, d in pairs])


def _amount_problem(amount: object) -> str | None:
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        return f"amount {amount!r} is not a number"
    if not value.is_finite():
        return f"amount {amount} is not a finite number"
    return None
