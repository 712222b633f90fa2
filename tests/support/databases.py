"""Databases for tests: a fresh, migrated database per test, on SQLite and on PostgreSQL.

Each database is a copy of a template migrated once per session (a file copy for SQLite,
``CREATE DATABASE ... TEMPLATE`` for PostgreSQL), so tests never share state.

PostgreSQL: ``BACKJOBS_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
names an admin connection; tests create and drop their own databases through it. When it is
unreachable the PostgreSQL tests skip, unless ``BACKJOBS_TEST_REQUIRE_POSTGRES=1`` (set by
``.ci/run``), which turns the skip into a failure.

Fixtures (loaded by ``tests/conftest.py``): ``db`` (both databases), ``sqlite_db``,
``pg_db``, ``app_env`` (the process's settings pointed at the test's database).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, text
from sqlalchemy.orm import Session

from backjobs.db import dispose_engines, make_engine, session_factory
from backjobs.db.migrate import upgrade_engine
from backjobs.settings import get_settings

PG_ADMIN_URL = os.environ.get(
    "BACKJOBS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_PG = os.environ.get("BACKJOBS_TEST_REQUIRE_POSTGRES") == "1"
SESSION_TAG = uuid.uuid4().hex[:8]


@dataclass
class Database:
    """A migrated database of its own: its URL, an engine, and a session maker."""

    kind: str
    url: str
    engine: Engine

    def session(self) -> Session:
        return session_factory(self.engine)()

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"


def _pg_admin_engine() -> Engine:
    return make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _pg_reachable() -> str | None:
    try:
        engine = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """The name of a migrated PostgreSQL template database, dropped at the end."""
    problem = _pg_reachable()
    if problem is not None:
        message = (
            f"PostgreSQL not reachable at {PG_ADMIN_URL} ({problem}); start it or set "
            "BACKJOBS_TEST_POSTGRES_URL to run these tests"
        )
        if REQUIRE_PG:
            pytest.fail(message)
        pytest.skip(message)
    name = f"backjobs_tmpl_{SESSION_TAG}"
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name)
    engine = make_engine(url)
    upgrade_engine(engine)
    engine.dispose()
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_engine(engine)
    engine.dispose()
    return path


def new_pg_database(template: str) -> tuple[str, str]:
    """Create a fresh copy of the template; returns (name, url)."""
    name = f"backjobs_t_{SESSION_TAG}_{uuid.uuid4().hex[:8]}"
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    admin.dispose()
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    return name, url


def drop_pg_database(name: str) -> None:
    admin = _pg_admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_db(sqlite_template: Path, tmp_path: Path) -> Iterator[Database]:
    path = tmp_path / "app.db"
    shutil.copyfile(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield Database("sqlite", f"sqlite:///{path}", engine)
    engine.dispose()


@pytest.fixture
def pg_db(request: pytest.FixtureRequest) -> Iterator[Database]:
    template = request.getfixturevalue("pg_template")
    name, url = new_pg_database(template)
    engine = make_engine(url)
    yield Database("postgresql", url, engine)
    engine.dispose()
    dispose_engines()
    drop_pg_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest) -> Database:
    """A fresh migrated database; every test using it runs on SQLite and on PostgreSQL."""
    fixture = "sqlite_db" if request.param == "sqlite" else "pg_db"
    database: Database = request.getfixturevalue(fixture)
    return database


@pytest.fixture
def app_env(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    """Point the process's settings (as a worker reads them) at this test's database.

    Flows read their settings from the environment, as a deployed worker does; this sets
    the environment, not a patched object. Tests replay fixed dates, many of them in the
    future, so ``BACKJOBS_ALLOW_FUTURE_AS_OF`` is on.
    """
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", db.url)
    monkeypatch.setenv("BACKJOBS_ALLOW_FUTURE_AS_OF", "true")
    monkeypatch.setenv("BACKJOBS_STORAGE_ROOT", str(tmp_path / "files"))
    monkeypatch.setenv("BACKJOBS_EMAIL_PICKUP_DIR", str(tmp_path / "mail"))
    get_settings.cache_clear()
    yield db
    dispose_engines()
    get_settings.cache_clear()
