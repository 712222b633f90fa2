"""``backjobs db upgrade``: migrate the configured database."""

from __future__ import annotations

import argparse
from typing import Any

from backjobs.cli.common import UsageError


def add_db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate the configured database")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(handler=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    from backjobs.db import normalize_url
    from backjobs.db.migrate import revision_exists, upgrade
    from backjobs.settings import get_settings

    url = get_settings().database_url
    if not revision_exists(args.revision):
        raise UsageError(
            f"--revision {args.revision!r} is not a migration of backjobs; use 'head' "
            "(the default) or a revision id from src/backjobs/db/migrations/versions"
        )
    upgrade(url, args.revision)
    print(
        f"database {normalize_url(url).render_as_string(hide_password=True)} is at {args.revision}"
    )
    return 0
