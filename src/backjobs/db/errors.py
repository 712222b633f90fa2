"""Which database errors are worth retrying (the tasks' retry policy asks here)."""

from __future__ import annotations


def is_transient_error(exc: BaseException) -> bool:
    """A database error worth retrying: a lost connection, a lock or serialization conflict.

    Integrity errors, bad SQL and bad data are not: retrying cannot fix them.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError

    if isinstance(exc, TimeoutError):  # pool exhausted
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "sqlstate", None)
        if code is not None:
            # 08 connection exception, 40 rollback (serialization, deadlock),
            # 53 insufficient resources, 55P03 lock not available, 57P0x admin shutdown.
            return code[:2] in {"08", "40", "53"} or code in {"55P03", "57P01", "57P02", "57P03"}
        if isinstance(exc, OperationalError):
            message = str(exc.orig).lower()
            if type(exc.orig).__module__.startswith("psycopg"):
                return True  # no SQLSTATE: the connection itself failed (refused, reset)
            return "locked" in message or "busy" in message  # SQLite's lock timeouts
    return isinstance(exc, ConnectionError)
