"""``backjobs db upgrade``: migrate the configured database (forwards only)."""

from __future__ import annotations

import argparse
from typing import Any

from backjobs.cli.common import UsageError


def add_db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate the configured database")
    upgrade.add_argument(
        "--revision", default="head", help="the revision to upgrade to (default head)"
    )
    upgrade.set_defaults(handler=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    from alembic.script import ScriptDirectory

    from backjobs.db import make_engine, normalize_url
    from backjobs.db.migrate import (
        alembic_config,
        current_revision,
        downgrade_problem,
        revision_exists,
        upgrade,
    )
    from backjobs.settings import get_settings

    url = get_settings().database_url
    revision = args.revision.strip()
    shown = normalize_url(url).render_as_string(hide_password=True)
    if not revision:
        raise UsageError("--revision is empty; use 'head' (the default) or a revision id")
    if revision == "base" or revision.startswith("-"):
        raise UsageError(
            f"--revision {revision!r} is a downgrade: backjobs db upgrade only moves forwards "
            "(downgrading drops the app's data; use alembic itself if you mean it)"
        )
    if not revision_exists(revision):
        raise UsageError(
            f"--revision {revision!r} is not a migration of backjobs; use 'head' "
            "(the default) or a revision id from src/backjobs/db/migrations/versions"
        )
    backwards = downgrade_problem(url, revision)
    if backwards:
        raise UsageError(
            f"--revision {revision!r} is a downgrade: database {shown} {backwards}; "
            "backjobs db upgrade only moves forwards"
        )
    upgrade(url, revision)
    engine = make_engine(url)
    try:
        now_at = current_revision(engine)
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    where = f"head ({now_at})" if now_at == head else (now_at or "base (empty)")
    print(f"database {shown} is at {where}")
    return 0
