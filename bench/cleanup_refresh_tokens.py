"""CleanupJob's batched delete of expired refresh tokens against one plain DELETE.

    python bench/cleanup_refresh_tokens.py [--n 1000000] [--live 100000] [--batch 1000 ...]

Seeds ``n`` expired and ``live`` unexpired tokens, then deletes the expired ones once with
a single ``DELETE ... WHERE expires_at < :now`` (the baseline) and once per batch size
with the job's own function, re-seeding before each. ``ratio`` = the job's rows/s at the
first batch size ÷ the direct statement's rows/s. The longest batch transaction is the
longest time any lock is held.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

from _pg import bench_database
from sqlalchemy import Engine, text

from backjobs.db.batched_delete import iter_delete_batches
from backjobs.models import RefreshToken

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def seed(engine: Engine, *, n: int, live: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE refresh_tokens, users RESTART IDENTITY CASCADE"))
        conn.execute(text("INSERT INTO users (email) VALUES ('bench@example.com')"))
        # Expired and live tokens interleaved, as a real table would hold them.
        conn.execute(
            text(
                "INSERT INTO refresh_tokens (user_id, token_hash, expires_at) "
                "SELECT 1, md5(g::text), CASE WHEN g % :every = 0 "
                "THEN :now + interval '1 day' ELSE :now - (g || ' seconds')::interval END "
                "FROM generate_series(1, :total) AS g"
            ),
            {
                "every": max(1, (n + live) // live) if live else n + live + 1,
                "now": NOW,
                "total": n + live,
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE refresh_tokens"))
        conn.execute(text("CHECKPOINT"))


def expired(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM refresh_tokens WHERE expires_at < :now"), {"now": NOW}
            )
            or 0
        )


def direct(engine: Engine) -> tuple[int, float]:
    start = time.perf_counter()
    with engine.begin() as conn:
        rows = conn.execute(
            text("DELETE FROM refresh_tokens WHERE expires_at < :now"), {"now": NOW}
        ).rowcount
    return rows, time.perf_counter() - start


def batched(engine: Engine, batch: int) -> tuple[int, float, float]:
    rows, longest = 0, 0.0
    start = last = time.perf_counter()
    for count in iter_delete_batches(engine, RefreshToken.expires_at, before=NOW, batch_size=batch):
        now = time.perf_counter()
        rows, longest, last = rows + count, max(longest, now - last), now
    return rows, time.perf_counter() - start, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="expired tokens")
    parser.add_argument("--live", type=int, default=100_000, help="unexpired tokens kept")
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    with bench_database("backjobs_bench_cleanup") as engine:
        seed(engine, n=args.n, live=args.live)
        n = expired(engine)
        rows, seconds = direct(engine)
        assert rows == n, (rows, n)
        lines = [("single DELETE (baseline)", rows, seconds, seconds)]
        for batch in args.batch:
            seed(engine, n=args.n, live=args.live)
            rows, seconds_b, longest = batched(engine, batch)
            assert rows == n and expired(engine) == 0, (rows, n)
            lines.append((f"job, batches of {batch}", rows, seconds_b, longest))
    print(f"{'method':<26} {'rows':>9} {'seconds':>8} {'rows/s':>10} {'longest tx s':>13}")
    for name, rows, secs, longest in lines:
        print(f"{name:<26} {rows:>9} {secs:>8.2f} {rows / secs:>10.0f} {longest:>13.3f}")
    base = lines[0][1] / lines[0][2]
    job = lines[1][1] / lines[1][2]
    print(
        json.dumps(
            {
                "bench": "cleanup_refresh_tokens",
                "expired": n,
                "live": args.live,
                "direct_rows_per_s": round(base),
                "direct_seconds": round(lines[0][2], 3),
                **{
                    f"batch_{b}_rows_per_s": round(r / s)
                    for (_, r, s, _), b in zip(lines[1:], args.batch, strict=True)
                },
                **{
                    f"batch_{b}_longest_tx_s": round(lg, 3)
                    for (_, _, _, lg), b in zip(lines[1:], args.batch, strict=True)
                },
                "ratio": round(job / base, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
