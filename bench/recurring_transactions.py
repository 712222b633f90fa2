"""Benchmark: ProcessRecurringTransactionsJob against hand-written SQL on PostgreSQL.

    .venv/bin/python bench/recurring_transactions.py [--n 100000] [--catch-up-n 10000]

Creates its own database through the admin URL ``BACKJOBS_BENCH_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and drops it at the end.

1. *due today*: ``--n`` definitions (weekly, monthly, yearly) each due once today. The job
   (``backjobs.jobs.recurring_transactions.process_recurring_transactions``, the domain
   function the flow's task calls, without Prefect's fixed per-run overhead) against the
   best hand-written single ``INSERT ... SELECT`` creating the same rows (the baseline of
   ``ratio``), and against one statement that also advances last_processed_date (the
   job's full work).
2. *catch-up*: ``--catch-up-n`` monthly definitions never processed, started
   ``--years`` years ago, against a ``generate_series`` ``INSERT ... SELECT``.

Each measurement runs ``--rounds`` times on the same data (reset in between); the best
time counts. The last line is one JSON object of the figures; ``ratio`` is the job's
definitions/s over the baseline's in scenario 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from _pg import bench_database
from sqlalchemy import Engine, text

from backjobs.jobs.recurrence import add_months
from backjobs.jobs.recurring_transactions import process_recurring_transactions
from backjobs.settings import Settings, load_settings

COLUMNS = "(owner_id, amount, currency, description, occurred_on, recurring_transaction_id)"
DUE = (
    "enabled AND start_date <= :today"
    " AND (last_processed_date IS NULL OR last_processed_date < :today)"
)
BASELINE_INSERT = f"""
    INSERT INTO transactions {COLUMNS}
    SELECT owner_id, amount, currency, description, :today, id
    FROM recurring_transactions WHERE {DUE}
    ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
"""
BASELINE_INSERT_AND_ADVANCE = f"""
    WITH due AS (
        UPDATE recurring_transactions SET last_processed_date = :today WHERE {DUE}
        RETURNING id, owner_id, amount, currency, description
    )
    INSERT INTO transactions {COLUMNS}
    SELECT owner_id, amount, currency, description, :today, id FROM due
    ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
"""
BASELINE_CATCH_UP = f"""
    INSERT INTO transactions {COLUMNS}
    SELECT r.owner_id, r.amount, r.currency, r.description, o.day, r.id
    FROM recurring_transactions AS r
    CROSS JOIN LATERAL generate_series(0, :max_k) AS k
    CROSS JOIN LATERAL (
        -- date + n months clamps to the month's end, anchored to start_date
        SELECT CAST(r.start_date + make_interval(months => k * r.interval) AS date) AS day
    ) AS o
    WHERE r.enabled AND o.day <= :today
    ON CONFLICT (recurring_transaction_id, occurred_on) DO NOTHING
"""


def seed_due_today(engine: Engine, *, n: int, today: date) -> None:
    """n definitions, each with exactly one occurrence due today (a third of each kind)."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE transactions, recurring_transactions RESTART IDENTITY"))
        conn.execute(
            text(
                "INSERT INTO users (email) SELECT 'u' || g || '@bench.test'"
                " FROM generate_series(1, 1000) AS g ON CONFLICT DO NOTHING"
            )
        )
        conn.execute(
            text("""
            INSERT INTO recurring_transactions
                (owner_id, amount, currency, description, frequency, interval, start_date)
            SELECT 1 + g % 1000, (g % 100000) / 100.0 + 0.0123, 'EUR', 'bench ' || g,
                   (ARRAY['weekly', 'monthly', 'yearly'])[1 + g % 3],
                   1, :today - CASE WHEN g % 3 = 0 THEN 7 * (1 + g % 50) ELSE 0 END
            FROM generate_series(1, :n) AS g
        """),
            {"n": n, "today": today},
        )
    reset_due_today(engine, today=today)


def reset_due_today(engine: Engine, *, today: date) -> None:
    """Back to the seeded state: no transactions, weekly ones processed through yesterday."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE transactions"))
        conn.execute(
            text(
                "UPDATE recurring_transactions SET last_processed_date ="
                " CASE WHEN frequency = 'weekly' THEN CAST(:yesterday AS date) END"
            ),
            {"yesterday": today - timedelta(days=1)},
        )
    vacuum(engine)


def seed_catch_up(engine: Engine, *, n: int, today: date, years: int) -> None:
    """n monthly definitions started ``years`` years ago on varied days, never processed."""
    start = add_months(today, -12 * years)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE transactions, recurring_transactions RESTART IDENTITY"))
        conn.execute(
            text("""
            INSERT INTO recurring_transactions
                (owner_id, amount, currency, description, frequency, interval, start_date)
            SELECT 1 + g % 1000, 12.3456, 'EUR', 'rent ' || g, 'monthly', 1,
                   CAST(:start AS date) + g % 28
            FROM generate_series(1, :n) AS g
        """),
            {"n": n, "start": start},
        )
    reset_catch_up(engine)


def reset_catch_up(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE transactions"))
        conn.execute(text("UPDATE recurring_transactions SET last_processed_date = NULL"))
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE recurring_transactions"))
        conn.execute(text("VACUUM ANALYZE transactions"))


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM transactions")).scalar_one())


def fingerprint(engine: Engine) -> str:
    """A digest of every created row's content: equal for equal row sets."""
    with engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT md5(string_agg(concat_ws('|', recurring_transaction_id, occurred_on,"
                    " owner_id, amount, currency, description), ',' ORDER BY"
                    " recurring_transaction_id, occurred_on)) FROM transactions"
                )
            ).scalar_one()
        )


def timed(reset: Callable[[], None], run: Callable[[], object]) -> float:
    reset()
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def sql(engine: Engine, statement: str, **params: object) -> Callable[[], None]:
    def run() -> None:
        with engine.begin() as conn:
            conn.execute(text(statement), params)

    return run


def measure(
    engine: Engine,
    *,
    label: str,
    defs: int,
    reset: Callable[[], None],
    methods: dict[str, Callable[[], object]],
    rounds: int,
) -> list[dict[str, object]]:
    # Rounds interleave the methods, so that load from elsewhere falls on all of them alike.
    best = dict.fromkeys(methods, float("inf"))
    created: dict[str, int] = {}
    digests = set()
    for round_ in range(rounds):
        for method, run in methods.items():
            best[method] = min(best[method], timed(reset, run))
            if round_ == 0:
                created[method] = rows(engine)
                digests.add(fingerprint(engine))
    found = []
    for method, seconds in best.items():
        found.append(
            {
                "scenario": label,
                "method": method,
                "definitions": defs,
                "rows": created[method],
                "seconds": round(seconds, 3),
                "definitions_per_s": round(defs / seconds),
                "rows_per_s": round(created[method] / seconds),
            }
        )
    if len(digests) != 1:
        raise SystemExit(f"{label}: the methods created different rows: {found}")
    return found


def print_table(results: list[dict[str, object]]) -> None:
    """Text columns left-aligned, figures right-aligned."""
    head = ("scenario", "method", "definitions", "rows", "seconds", "definitions/s", "rows/s")
    keys = ("scenario", "method", "definitions", "rows", "seconds", "definitions_per_s")
    lines = [[str(r[k]) for k in keys] + [str(r["rows_per_s"])] for r in results]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for line in lines:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="definitions due today")
    parser.add_argument("--catch-up-n", type=int, default=10_000, help="catch-up definitions")
    parser.add_argument("--years", type=int, default=10, help="years of missed occurrences")
    parser.add_argument("--rounds", type=int, default=3, help="runs per method; best counts")
    parser.add_argument(
        "--batch-size", type=int, default=Settings.model_fields["recurring_batch_size"].default
    )
    args = parser.parse_args()
    now = datetime.now(UTC)
    today = now.date()
    with bench_database("backjobs_bench_recurring") as engine:
        results = run_scenarios(engine, args=args, now=now, today=today)
    print_table(results)
    summarize(results, args=args)


def run_scenarios(
    engine: Engine, *, args: argparse.Namespace, now: datetime, today: date
) -> list[dict[str, object]]:
    def job() -> object:
        settings = load_settings(recurring_batch_size=args.batch_size)
        return process_recurring_transactions(engine, now=now, settings=settings)

    seed_due_today(engine, n=args.n, today=today)
    results = measure(
        engine,
        label="due today",
        defs=args.n,
        rounds=args.rounds,
        reset=lambda: reset_due_today(engine, today=today),
        methods={
            "job (process_recurring_transactions)": job,
            "baseline: INSERT ... SELECT": sql(engine, BASELINE_INSERT, today=today),
            "hand-written insert + advance": sql(engine, BASELINE_INSERT_AND_ADVANCE, today=today),
        },
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seed_catch_up(engine, n=args.catch_up_n, today=today, years=args.years)
    results += measure(
        engine,
        label=f"catch-up {args.years}y monthly",
        defs=args.catch_up_n,
        rounds=args.rounds,
        reset=lambda: reset_catch_up(engine),
        methods={
            "job (process_recurring_transactions)": job,
            "baseline: generate_series INSERT": sql(
                engine, BASELINE_CATCH_UP, today=today, max_k=12 * args.years + 1
            ),
        },
    )
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(f"peak RSS growth during the catch-up scenario: {growth / 1024:.0f} MiB")
    return results


def summarize(results: list[dict[str, object]], *, args: argparse.Namespace) -> None:
    by = {(r["scenario"], r["method"]): r for r in results}
    catch = f"catch-up {args.years}y monthly"
    job = float(by["due today", "job (process_recurring_transactions)"]["definitions_per_s"])  # type: ignore[arg-type]
    base = float(by["due today", "baseline: INSERT ... SELECT"]["definitions_per_s"])  # type: ignore[arg-type]
    full = float(by["due today", "hand-written insert + advance"]["definitions_per_s"])  # type: ignore[arg-type]
    cjob = float(by[catch, "job (process_recurring_transactions)"]["rows_per_s"])  # type: ignore[arg-type]
    cbase = float(by[catch, "baseline: generate_series INSERT"]["rows_per_s"])  # type: ignore[arg-type]
    print(
        json.dumps(
            {
                "benchmark": "recurring_transactions",
                "n": args.n,
                "job_definitions_per_s": job,
                "baseline_definitions_per_s": base,
                "insert_and_advance_definitions_per_s": full,
                "catch_up_definitions": args.catch_up_n,
                "catch_up_years": args.years,
                "catch_up_rows": by[catch, "job (process_recurring_transactions)"]["rows"],
                "catch_up_job_seconds": by[catch, "job (process_recurring_transactions)"][
                    "seconds"
                ],
                "catch_up_job_rows_per_s": cjob,
                "catch_up_baseline_rows_per_s": cbase,
                "catch_up_ratio": round(cjob / cbase, 3),
                "ratio_vs_insert_and_advance": round(job / full, 3),
                "ratio": round(job / base, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
