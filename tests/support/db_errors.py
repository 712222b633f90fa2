"""Real database errors, provoked on purpose, for the transient-error tests."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backjobs.db import make_engine


def error_of(engine_url: str, sql: str, *, setup: str | None = None) -> DBAPIError:
    engine = make_engine(engine_url)
    try:
        with engine.begin() as conn:
            if setup:
                conn.execute(text(setup))
            conn.execute(text(sql))
    except DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{sql!r} did not fail")
