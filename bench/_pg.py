"""A throwaway PostgreSQL database for one benchmark run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, make_url, text

from backjobs.db import make_engine
from backjobs.db.migrate import upgrade_engine

ADMIN_URL = os.environ.get(
    "BACKJOBS_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextmanager
def bench_database(prefix: str) -> Iterator[Engine]:
    """Create a migrated database, yield its engine, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(make_url(ADMIN_URL).set(database=name))
    try:
        upgrade_engine(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
