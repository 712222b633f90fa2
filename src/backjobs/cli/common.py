"""What the command groups of ``backjobs`` share: the usage error, argument types
(``--as-of``, row ids, ports), the one line for a database a command cannot use, and the
environment a command sets before it imports Prefect."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime

# The --as-of a job accepts. Jobs step up to BACKJOBS_*_DAYS (≤ 100 years) either side of
# as_of and walk recurring occurrences from it: within these years every job's date
# arithmetic stays inside Python's years 1-9999 (0001-01-02 overflowed in a job).
EARLIEST_AS_OF = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_AS_OF = datetime(9000, 1, 1, tzinfo=UTC)

# Row ids are BIGINT (PostgreSQL) / INTEGER (SQLite, 64-bit): larger ones cannot exist.
MAX_ROW_ID = 2**63 - 1


class UsageError(Exception):
    """The command line asks for something that cannot be: exit status 2."""


class DatabaseUnusable(Exception):
    """A command could not use the database; ``str`` is the one line, ``code`` the exit
    status (2 when the operator must fix the setting or migrate, 1 otherwise)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_as_of(value: str, *, option: str = "--as-of", bounded: bool = True) -> datetime:
    """ISO-8601; ``Z`` accepted; a value without offset is UTC. ``bounded``: a job's clock,
    within :data:`EARLIEST_AS_OF` and :data:`LATEST_AS_OF`."""
    from backjobs.clock import to_utc

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} {value!r} is not an ISO-8601 date-time (e.g. 2030-01-01T00:00:00Z)"
        ) from None
    try:
        moment = to_utc(parsed)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is outside years 1-9999 once converted to UTC"
        ) from None
    if bounded and not EARLIEST_AS_OF <= moment < LATEST_AS_OF:
        raise argparse.ArgumentTypeError(
            f"{option} {value!r} is outside the years a job can run at "
            f"({EARLIEST_AS_OF.year}-{LATEST_AS_OF.year - 1}, UTC)"
        )
    return moment


def row_id(value: str) -> int:
    """A row id: a whole number from 1 to 2**63-1 (the id columns' range)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a row id (a whole number)") from None
    if not 1 <= number <= MAX_ROW_ID:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a row id: ids run from 1 to {MAX_ROW_ID}"
        )
    return number


def port_number(value: str) -> int:
    """A TCP port to listen on: 1-65535."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {value!r} is not between 1 and 65535")
    return number


def database_unusable(exc: BaseException, *, doing: str = "") -> DatabaseUnusable:
    """The one line for a database error, told apart by kind: unreachable (check the URL and
    the server), not migrated (run ``backjobs db upgrade``), read-only, other."""
    from backjobs.db.migrate import DatabaseFault, classify_database_error

    orig = getattr(exc, "orig", None) or exc
    reason = first_line(orig) or type(orig).__name__
    where = f"{doing} in database {database_shown()}" if doing else f"database {database_shown()}"
    fault = classify_database_error(exc)
    if fault is DatabaseFault.UNREACHABLE:
        return DatabaseUnusable(
            f"{where}: {reason} — check BACKJOBS_DATABASE_URL and that the database server is "
            "running and reachable",
            1,
        )
    if fault is DatabaseFault.NOT_MIGRATED:
        return DatabaseUnusable(
            f"{where}: {reason} — it is not migrated: run `backjobs db upgrade`", 2
        )
    if fault is DatabaseFault.READ_ONLY:
        return DatabaseUnusable(
            f"{where}: {reason} — the database is read-only to this user; "
            "this command needs to write (even reads take SQLite's write lock)",
            1,
        )
    return DatabaseUnusable(f"{where}: {reason}", 1)


def require_database_file() -> None:
    """For a read-only command: a SQLite file that does not exist is named, never created."""
    from backjobs.db.migrate import missing_sqlite_file
    from backjobs.settings import get_settings

    missing = missing_sqlite_file(get_settings().database_url)
    if missing is not None:
        raise DatabaseUnusable(
            f"database {database_shown()}: no such file {missing} — check "
            "BACKJOBS_DATABASE_URL (`backjobs db upgrade` creates a new database)",
            2,
        )


def database_shown() -> str:
    """The configured database URL, password hidden."""
    from backjobs.db import normalize_url
    from backjobs.settings import get_settings

    try:
        return normalize_url(get_settings().database_url).render_as_string(hide_password=True)
    except Exception:
        return "(BACKJOBS_DATABASE_URL)"


def log_to_terminal() -> None:
    """backjobs' own INFO lines on stderr; third-party libraries stay at WARNING."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("backjobs")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def prefect_defaults() -> None:
    """Environment defaults for a command that talks to Prefect, before it imports Prefect."""
    # Offline machines: no telemetry. (Domain logs reach the run's logs through the job
    # base, which attaches Prefect's API handler itself: by now Prefect may have been
    # imported and PREFECT_LOGGING_EXTRA_LOGGERS would be read too late.)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "backjobs")
    # `backjobs run` without PREFECT_API_URL starts a temporary server; Prefect gives it
    # 20 s, which a busy machine exceeds ("Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


HEALTH_TIMEOUT = 15.0  # seconds the Prefect server has to answer GET /health


def require_prefect_server() -> None:
    """Fail at once, naming the URL, unless the server PREFECT_API_URL names answers
    ``GET /health`` within ``HEALTH_TIMEOUT``. Prefect's client waits 60 s per request and
    retries a timeout five times: against a hung server (or a port that accepts but never
    answers) ``trigger`` and ``deploy`` sat silent for over five minutes."""
    import httpx
    from prefect.settings import get_current_settings

    api = get_current_settings().api  # TLS as Prefect's client does it
    verify = False if api.tls_insecure_skip_verify else (api.ssl_cert_file or True)
    url = os.environ["PREFECT_API_URL"].rstrip("/")
    try:
        answer = httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT, verify=verify)
    except httpx.TimeoutException:
        raise httpx.ReadTimeout(f"no answer to GET /health in {HEALTH_TIMEOUT:.0f} s") from None
    if answer.status_code == 404:
        raise UsageError(
            f"PREFECT_API_URL={url} answered 404 to GET /health: it must be the server's API "
            "URL, ending in /api"
        )
    if not answer.is_success:
        raise RuntimeError(
            f"the Prefect server at {url} answered {answer.status_code} to GET /health: "
            f"{answer.text.strip()[:200]}"
        )


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
