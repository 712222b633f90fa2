"""ProcessRecurringTransactionsJob on PostgreSQL: one statement a batch.

The statement claims the next keyset batch of due definitions (``FOR UPDATE SKIP
LOCKED``: a concurrent run skips them instead of waiting or redoing them), checks them,
advances ``last_processed_date`` where it is still behind (the claim), and inserts the
occurrences of exactly the definitions it advanced — one round trip and no per-row Python
instead of a read, an occurrence loop in Python and a write.

Occurrences are computed by PostgreSQL's calendar, with the rules of
:mod:`backjobs.jobs.recurrence`: the n-th occurrence is ``start_date + n * interval``
periods counted from the start; ``date + interval 'n months'`` clamps to the month's last
day (Jan 31 + 1 month = Feb 29 in 2024, + 2 months = Mar 31; Feb 29 + 12 months = Feb 28).
Only the indices that can fall in [first, last] are generated: from the whole periods
between start_date's month (or day) and first's, whose occurrence lies in a month (or on
a day) not after first's, to those up to last; so a definition due once costs one or two
candidates, and a catch-up of years one per occurrence.
Arithmetic is in bigint and ``n * step`` never exceeds the span in days or months, so no
interval, however large, can overflow.

Definitions the checks refuse are returned (typed, as stored) for the caller to report
with its reasons; their ``last_processed_date`` is left alone.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import NamedTuple

from sqlalchemy import Connection, text

_BATCH = text("""
WITH due AS (
    SELECT id, owner_id, amount, currency, description, frequency, "interval",
           start_date, end_date,
           COALESCE(
               frequency IN ('weekly', 'monthly', 'yearly') AND "interval" >= 1
               AND (end_date IS NULL OR end_date >= start_date)
               AND CAST(amount AS text) NOT IN ('NaN', 'Infinity', '-Infinity'),
               false) AS ok,
           COALESCE(last_processed_date + 1, start_date) AS first,
           LEAST(CAST(:through AS date), COALESCE(end_date, :through)) AS last,
           -- the period: 7 * interval days (weekly), or interval * months
           CAST("interval" AS bigint) * CASE frequency WHEN 'weekly' THEN 7
               WHEN 'monthly' THEN 1 ELSE 12 END AS step,
           frequency = 'weekly' AS weekly
    FROM recurring_transactions
    WHERE id > :after AND enabled AND start_date <= :through
      AND (last_processed_date IS NULL OR last_processed_date < :through)
      AND (end_date IS NULL OR last_processed_date IS NULL OR last_processed_date < end_date)
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), adv AS (
    UPDATE recurring_transactions AS r SET last_processed_date = p.last
    FROM due AS p
    WHERE p.ok AND r.id = p.id AND (r.last_processed_date IS NULL OR r.last_processed_date < p.last)
      -- the batch's id range: an index range scan, not a scan of the whole table
      AND r.id > :after AND r.id <= (SELECT max(id) FROM due)
    RETURNING r.id
), ins AS (
    INSERT INTO transactions
        (owner_id, amount, currency, description, occurred_on, recurring_transaction_id)
    SELECT p.owner_id, p.amount, p.currency, p.description, o.day, p.id
    FROM due AS p
    JOIN adv ON adv.id = p.id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p.weekly THEN p.start_date + CAST(n * p.step AS integer)
                    ELSE CAST(p.start_date + make_interval(months => CAST(n * p.step AS integer))
                              AS date)
               END AS day
        FROM generate_series(
            CASE WHEN p.weekly THEN GREATEST(0, (p.first - p.start_date) / p.step)
                 ELSE GREATEST(0, (
                     (date_part('year', p.first) - date_part('year', p.start_date)) * 12
                     + date_part('month', p.first) - date_part('month', p.start_date)
                 )::bigint / p.step)
            END,
            CASE WHEN p.weekly THEN (p.last - p.start_date) / p.step
                 ELSE (
                     (date_part('year', p.last) - date_part('year', p.start_date)) * 12
                     + date_part('month', p.last) - date_part('month', p.start_date)
                 )::bigint / p.step
            END
        ) AS n
        OFFSET 0  -- evaluate the day once a row, not again in the filter below
    ) AS o
    WHERE o.day BETWEEN p.first AND p.last
    ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
    RETURNING 1
)
SELECT 'n' AS kind, (SELECT count(*) FROM due) AS id, (SELECT max(id) FROM due) AS last_id,
       (SELECT count(*) FROM adv) AS advanced, (SELECT count(*) FROM ins) AS created,
       NULL AS frequency, NULL AS "interval", NULL AS start_date, NULL AS end_date,
       NULL AS amount
UNION ALL
SELECT 'i', id, NULL, NULL, NULL, frequency, "interval", start_date, end_date, amount
FROM due WHERE NOT ok
""")


_NO_JIT = text("SET LOCAL jit = off")


class Refused(NamedTuple):
    """A due definition the statement's checks refused, typed as stored."""

    id: int
    frequency: str
    interval: int
    start_date: date
    end_date: date | None
    amount: Decimal | None


class BatchFigures(NamedTuple):
    scanned: int
    last_id: int | None
    processed: int
    created: int
    invalid: list[Refused]


def process_batch(conn: Connection, *, after_id: int, through: date, limit: int) -> BatchFigures:
    """Claim, advance and insert one batch in the caller's transaction (one statement)."""
    # generate_series makes the planner expect ~100 rows a definition, which prices the
    # statement above jit_above_cost: compiling it would cost more (~0.3 s) than running it.
    conn.execute(_NO_JIT)
    rows = conn.execute(_BATCH, {"after": after_id, "through": through, "limit": limit}).all()
    head = next(r for r in rows if r.kind == "n")
    refused = [
        Refused(r.id, r.frequency, r.interval, r.start_date, r.end_date, r.amount)
        for r in rows
        if r.kind == "i"
    ]
    return BatchFigures(int(head.id), head.last_id, int(head.advanced), int(head.created), refused)
