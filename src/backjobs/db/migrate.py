"""Apply the Alembic migrations to a database (``backjobs db upgrade``), and say what is
wrong with a database a command cannot use.

:func:`classify_database_error` is the one place that tells an unreachable database from
one that is not migrated (or read-only): every command's error line is built on it, so
a closed port never reads "is it migrated?". :func:`check_ready` is the up-front check of
a command that only reads (``backjobs run``, ``outbox status``): a missing SQLite file is
named and never created, an old schema names ``backjobs db upgrade``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from backjobs.db import normalize_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    rendered = normalize_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``."""
    command.upgrade(alembic_config(url), revision)


class DatabaseFault(StrEnum):
    """What kind of trouble a database error is: it decides the error line and its hint."""

    UNREACHABLE = "unreachable"  # no connection: host, port, credentials, file, database name
    NOT_MIGRATED = "not migrated"  # a table or column of backjobs is missing
    READ_ONLY = "read-only"
    OTHER = "other"


class DatabaseNotReady(LookupError):
    """The database is missing or not at the latest migration; the message says what to do."""


# PostgreSQL SQLSTATEs: 08 connection, 28 authorization, 3D000 no such database;
# 42P01 undefined table, 42703 undefined column, 3F000 no such schema; 25006 read-only.
_PG_UNREACHABLE_CLASSES = ("08", "28")
_PG_NOT_MIGRATED = {"42P01", "42703", "3F000"}


def classify_database_error(exc: BaseException) -> DatabaseFault:
    """The kind of a database error (SQLAlchemy's, or the driver's underneath it)."""
    from sqlalchemy.exc import DBAPIError, NoSuchTableError

    if isinstance(exc, NoSuchTableError):
        return DatabaseFault.NOT_MIGRATED
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlstate", None)
    if isinstance(code, str):
        if code[:2] in _PG_UNREACHABLE_CLASSES or code == "3D000":
            return DatabaseFault.UNREACHABLE
        if code in _PG_NOT_MIGRATED:
            return DatabaseFault.NOT_MIGRATED
        return DatabaseFault.READ_ONLY if code == "25006" else DatabaseFault.OTHER
    module = type(orig).__module__
    message = str(orig).lower()
    if module.startswith("psycopg"):
        # No SQLSTATE: the connection itself failed (refused, reset, name not resolved).
        is_operational = type(orig).__name__ == "OperationalError"
        return DatabaseFault.UNREACHABLE if is_operational else DatabaseFault.OTHER
    if "no such table" in message or "no such column" in message:
        return DatabaseFault.NOT_MIGRATED
    if "readonly database" in message or "read-only" in message:
        return DatabaseFault.READ_ONLY
    if "unable to open database" in message or "not a database" in message:
        return DatabaseFault.UNREACHABLE
    return DatabaseFault.OTHER


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` when it does not exist (a mistyped path), else None.

    A read-only command checks this first: SQLite (and :func:`backjobs.db.make_engine`)
    would create the file and its folders on connect.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    name = parsed.database or ""
    if name in ("", ":memory:") or name.startswith("file:"):
        return None
    return None if Path(name).is_file() else Path(name)


def check_ready(url: str) -> None:
    """Raise :class:`DatabaseNotReady` unless the database exists and is at the latest
    migration; a connection error propagates (:func:`classify_database_error` names it).
    """
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    shown = normalize_url(url).render_as_string(hide_password=True)
    missing = missing_sqlite_file(url)
    if missing is not None:
        raise DatabaseNotReady(
            f"database {shown}: no such file {missing}; check BACKJOBS_DATABASE_URL "
            "(`backjobs db upgrade` creates a new database)"
        )
    from backjobs.db.engine import make_engine

    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    if current == head:
        return
    if current is None:
        raise DatabaseNotReady(
            f"database {shown} is not migrated (no backjobs schema): run `backjobs db upgrade`"
        )
    try:
        known = script.get_revision(current) is not None
    except CommandError:
        known = False
    if not known:
        raise DatabaseNotReady(
            f"database {shown} is at revision {current}, which this backjobs does not know "
            "(migrated by a newer version?)"
        )
    raise DatabaseNotReady(
        f"database {shown} is at revision {current}, not the latest ({head}): "
        "run `backjobs db upgrade`"
    )


def downgrade_problem(url: str, revision: str) -> str | None:
    """Why upgrading the database at ``url`` to ``revision`` would go backwards, or None.

    ``backjobs db upgrade`` only moves forwards: alembic's ``upgrade`` to an older revision
    silently does nothing, which reads as success.
    """
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from backjobs.db.engine import make_engine

    if missing_sqlite_file(url) is not None:
        return None  # a new database: every revision is forwards
    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current is None:
        return None
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    try:
        resolved = script.get_revision(revision)
    except CommandError:
        return None  # a relative or symbolic revision: alembic judges it
    if resolved is None or resolved.revision == current:
        return None
    ancestors = {r.revision for r in script.iterate_revisions(current, "base")}
    if resolved.revision in ancestors:
        return f"is at {current}, a later revision than {resolved.revision}"
    return None


def revision_exists(revision: str) -> bool:
    """Whether ``revision`` (an id, a unique prefix, ``head``, ``base``, ``+1``…) resolves."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    if revision in ("head", "heads", "base") or any(c in revision for c in "+-@:"):
        return True  # a relative or ranged expression: alembic itself judges it
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Migrate through an existing engine (tests build their databases this way)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
