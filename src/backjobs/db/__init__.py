"""The application database: engines and sessions, transient-error classification, column
types, batched deletes and the Alembic migrations.

The names most callers need are importable from here: ``from backjobs.db import
get_engine, session_scope``.
"""

from backjobs.db.engine import (
    dispose_engines,
    get_engine,
    is_postgres,
    make_engine,
    normalize_url,
    session_factory,
    session_scope,
)
from backjobs.db.errors import is_transient_error

__all__ = [
    "dispose_engines",
    "get_engine",
    "is_postgres",
    "is_transient_error",
    "make_engine",
    "normalize_url",
    "session_factory",
    "session_scope",
]
