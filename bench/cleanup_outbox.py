"""CleanupJob's ``delete_ended_outbox_rows`` against one plain DELETE of the same rows.

    python bench/cleanup_outbox.py [--n 300000] [--batch 1000 ...]

Seeds ``n`` email rows created over 60 days in id order (95 % completed a minute after
creation, 3 % failed without ``completed_at``, 2 % pending), then deletes those ended more
than 30 days ago once with a single ``DELETE`` with the job's condition (the baseline) and
once per batch size with the job's own function, re-seeding before each. ``ratio`` = the
job's rows/s at the first batch size ÷ the direct statement's rows/s.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta

from _pg import bench_database
from sqlalchemy import Engine, delete, text

from backjobs.jobs import cleanup
from backjobs.jobs.cleanup import ENDED
from backjobs.outbox_admin import TASKS, ended_at
from backjobs.settings import load_settings

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def seed(engine: Engine, *, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE app_tasks RESTART IDENTITY"))
        conn.execute(
            text(
                "INSERT INTO app_tasks (task_type, status, payload, created_at, next_attempt_at,"
                " completed_at) "
                "SELECT 'email_send', s.status, '{}'::jsonb, s.at, s.at,"
                " CASE WHEN s.status = 'completed' THEN s.at + interval '1 minute' END "
                "FROM (SELECT CASE WHEN g % 100 < 95 THEN 'completed' WHEN g % 100 < 98"
                " THEN 'failed' ELSE 'pending' END AS status,"
                " :now - ((:n - g) * (60 * 86400.0 / :n) || ' seconds')::interval AS at"
                " FROM generate_series(1, :n) AS g) AS s"
            ),
            {"n": n, "now": NOW},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE app_tasks"))
        conn.execute(text("CHECKPOINT"))


def direct(engine: Engine) -> int:
    condition = TASKS.c.status.in_(ENDED) & (ended_at() < NOW - timedelta(days=30))
    with engine.begin() as conn:
        return int(conn.execute(delete(TASKS).where(condition)).rowcount)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    rows: list[tuple[str, int, float]] = []
    with bench_database("bench_outbox") as engine:
        seed(engine, n=args.n)
        started = time.perf_counter()
        rows.append(("single DELETE (baseline)", direct(engine), time.perf_counter() - started))
        for batch in args.batch:
            seed(engine, n=args.n)
            settings = load_settings(outbox_retention_days=30, delete_batch_size=batch)
            started = time.perf_counter()
            result = cleanup.delete_ended_outbox_rows(engine, now=NOW, settings=settings)
            elapsed = time.perf_counter() - started
            rows.append((f"job, batches of {batch}", result.outbox_rows_deleted or 0, elapsed))
    print("| method | rows deleted | seconds | rows/s |\n|---|---:|---:|---:|")
    for name, count, seconds in rows:
        print(f"| {name} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} |")
    assert len({count for _, count, _ in rows}) == 1, "the methods deleted different rows"
    rate = {name: count / seconds for name, count, seconds in rows}
    figures = {name: round(seconds, 3) for name, _, seconds in rows}
    baseline = rate["single DELETE (baseline)"]
    ratio = rate[f"job, batches of {args.batch[0]}"] / baseline
    print(json.dumps({"n": args.n, "seconds": figures, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
