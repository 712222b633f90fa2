"""Benchmark: ExpireUnconfirmedRegistrationsJob against hand-written set-based SQL on PostgreSQL.

    .venv/bin/python bench/registration.py [--n 100000] [--batch-size 1000]

Creates its own database through the admin URL ``BACKJOBS_BENCH_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and drops it at the end.

Seeds ``--n`` pending unconfirmed users due for the expiry warning and ``--n`` past expiry
(plus as many confirmed users the jobs must leave alone), then runs each contender in a
fresh process (so peak RSS is its own) on the same freshly seeded data:

- **project**: the job's two domain functions, ``warn_expiring_registrations`` and
  ``decline_expired_registrations`` (what the flow's tasks call, without Prefect's fixed
  per-run cost): keyset batches, ``FOR UPDATE SKIP LOCKED``, a token per user, every email
  through the outbox (``enqueue_emails``: validated and test-rendered like
  ``enqueue_email``, one multi-row INSERT a batch), one transaction a batch.
- **baseline**: per phase one ``UPDATE … RETURNING`` over all due users, tokens made in
  Python, one multi-row ``INSERT`` of the token hashes and one multi-row outbox
  ``INSERT`` (payloads built in Python, nothing validated or rendered), one transaction.

users/s = 2 * n / seconds. The last line is one JSON object of the figures; ``ratio`` is
the project's users/s over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from _pg import bench_database
from sqlalchemy import Engine, make_url, text

from backjobs.db import make_engine
from backjobs.jobs.expire_unconfirmed_registrations import (
    decline_expired_registrations,
    warn_expiring_registrations,
)
from backjobs.registration import confirmation_link, hash_token, new_token
from backjobs.settings import load_settings

AS_OF = datetime(2026, 1, 10, 5, 0, tzinfo=UTC)

WARN_SQL = """
    UPDATE users SET expiry_warning_sent_at = :now
    WHERE registration_status = 'pending' AND email_confirmed_at IS NULL
      AND expiry_warning_sent_at IS NULL
      AND created_at > :expired_before AND created_at <= :warn_before
    RETURNING id, email, display_name, created_at
"""
DECLINE_SQL = """
    UPDATE users SET registration_status = 'declined'
    WHERE registration_status = 'pending' AND email_confirmed_at IS NULL
      AND created_at <= :expired_before
    RETURNING id, email, display_name, created_at
"""
TOKENS_SQL = """
    INSERT INTO email_confirmation_tokens (user_id, token_hash, expires_at, created_at)
    SELECT user_id, token_hash, expires_at, :now
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS r(user_id bigint, token_hash text, expires_at timestamptz)
"""
OUTBOX_SQL = """
    INSERT INTO app_tasks (task_type, status, priority, payload, attempts, max_attempts,
                           next_attempt_at)
    SELECT 'email_send', 'pending', 0, p, 0, 5, :now
    FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS p
"""


def seed(engine: Engine, *, n: int) -> None:
    """n users due for a warning, n past expiry, n confirmed (untouched), interleaved."""
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE app_tasks, email_confirmation_tokens, users RESTART IDENTITY CASCADE")
        )
        conn.execute(
            text("""
                INSERT INTO users (email, display_name, created_at, email_confirmed_at)
                SELECT 'u' || g || '@bench.test', 'User ' || g,
                       CASE g % 3 WHEN 0 THEN :warn WHEN 1 THEN :gone ELSE :gone END,
                       CASE g % 3 WHEN 2 THEN :gone ELSE NULL END
                FROM generate_series(0, :total - 1) AS g
            """),
            {
                "warn": AS_OF - timedelta(days=6),
                "gone": AS_OF - timedelta(days=30),
                "total": 3 * n,
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE users"))
        conn.execute(text("CHECKPOINT"))


def run_project(url: str, batch_size: int) -> None:
    engine = make_engine(url)
    settings = load_settings(registration_batch_size=batch_size)
    warn_expiring_registrations(engine, now=AS_OF, settings=settings)
    decline_expired_registrations(engine, now=AS_OF, settings=settings)
    engine.dispose()


def run_baseline(url: str, batch_size: int) -> None:
    engine = make_engine(url)
    settings = load_settings()
    lifetime = timedelta(days=settings.registration_confirmation_days)
    window = timedelta(days=settings.registration_expiry_warning_days)
    bounds = {"now": AS_OF, "expired_before": AS_OF - lifetime}
    with engine.begin() as conn:
        rows = conn.execute(
            text(WARN_SQL), {**bounds, "warn_before": AS_OF - lifetime + window}
        ).all()
        tokens = [new_token() for _ in rows]
        token_rows = [
            {
                "user_id": r.id,
                "token_hash": hash_token(t),
                "expires_at": _iso(r.created_at + lifetime),
            }
            for r, t in zip(rows, tokens, strict=True)
        ]
        conn.execute(text(TOKENS_SQL), {"now": AS_OF, "rows": json.dumps(token_rows)})
        payloads = [
            _payload(r.email, "registration_expiry_warning", {
                "display_name": r.display_name,
                "confirmation_link": confirmation_link(t, settings),
                "expires_at": _iso(r.created_at + lifetime),
            })
            for r, t in zip(rows, tokens, strict=True)
        ]  # fmt: skip
        conn.execute(text(OUTBOX_SQL), {"now": AS_OF, "rows": json.dumps(payloads)})
    with engine.begin() as conn:
        rows = conn.execute(text(DECLINE_SQL), bounds).all()
        payloads = [
            _payload(r.email, "registration_expired", {
                "display_name": r.display_name,
                "expired_at": _iso(r.created_at + lifetime),
                "register_url": settings.app_base_url,
            })
            for r in rows
        ]  # fmt: skip
        conn.execute(text(OUTBOX_SQL), {"now": AS_OF, "rows": json.dumps(payloads)})
    engine.dispose()


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _payload(to: str, template: str, context: dict[str, Any]) -> dict[str, Any]:
    return {"template": template, "to": [to], "context": context}


def _child(name: str, url: str, batch_size: int, out: Any) -> None:
    contender = run_project if name == "project" else run_baseline
    started = time.perf_counter()
    contender(url, batch_size)
    seconds = time.perf_counter() - started
    out.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(name: str, url: str, batch_size: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, url, batch_size, send))
    process.start()
    seconds, rss = receive.recv()
    process.join()
    return float(seconds), float(rss)


def check(engine: Engine, *, n: int) -> None:
    with engine.connect() as conn:
        tasks = conn.execute(text("SELECT count(*) FROM app_tasks")).scalar_one()
        tokens = conn.execute(text("SELECT count(*) FROM email_confirmation_tokens")).scalar_one()
        declined = conn.execute(
            text("SELECT count(*) FROM users WHERE registration_status = 'declined'")
        ).scalar_one()
    assert (tasks, tokens, declined) == (2 * n, n, n), (tasks, tokens, declined)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    figures: dict[str, Any] = {"bench": "registration", "n": args.n, "batch_size": args.batch_size}
    with bench_database("bench_registration") as engine:
        url = engine.url.render_as_string(hide_password=False)
        make_url(url)
        results = {}
        for name in ("baseline", "project"):
            seed(engine, n=args.n)
            seconds, rss = measure(name, url, args.batch_size)
            check(engine, n=args.n)
            results[name] = (seconds, rss)
    print(f"{2 * args.n:,} users ({args.n:,} warned, {args.n:,} declined), PostgreSQL\n")
    print("| contender | seconds | users/s | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for name, (seconds, rss) in results.items():
        print(f"| {name} | {seconds:.2f} | {2 * args.n / seconds:,.0f} | {rss:.1f} |")
        figures[f"{name}_users_per_s"] = round(2 * args.n / seconds)
        figures[f"{name}_seconds"] = round(seconds, 3)
        figures[f"{name}_peak_rss_mib"] = round(rss, 1)
    figures["ratio"] = round(results["baseline"][0] / results["project"][0], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
