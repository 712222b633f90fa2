"""Apply the Alembic migrations to a database (``backjobs db upgrade``)."""

from __future__ import annotations

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
