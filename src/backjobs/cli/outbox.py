"""``backjobs outbox status | retry --id N… | --failed-since ISO | show N``: the outbox for ops.

The printing side of :mod:`backjobs.outbox_admin`. A database that cannot be read is one
line naming it (password hidden) and saying which trouble it is: unreachable, not
migrated, read-only (:func:`backjobs.cli.common.database_unusable`). ``status`` and
``show`` only read: a SQLite file that does not exist is named, never created.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from backjobs.cli.common import (
    database_unusable,
    log_to_terminal,
    parse_as_of,
    require_database_file,
    row_id,
)


def add_outbox_commands(commands: Any) -> None:
    """``backjobs outbox status | retry | show`` on the ``backjobs`` parser's subcommands."""
    outbox = commands.add_parser("outbox", help="the email outbox (app_tasks) for ops")
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="counts by status, due now, failed in 24 h")
    status.set_defaults(handler=_outbox_status)
    retry = actions.add_parser("retry", help="failed rows back to pending with fresh attempts")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", type=row_id, nargs="+", metavar="N", help="row ids")
    which.add_argument(
        "--failed-since",
        type=lambda value: parse_as_of(value, option="--failed-since", bounded=False),
        metavar="ISO",
        help="every row that failed at or after this ISO-8601 time",
    )
    retry.set_defaults(handler=_outbox_retry)
    show = actions.add_parser("show", help="one row: status, attempts, error, recipients")
    show.add_argument("id", type=row_id, metavar="N")
    show.set_defaults(handler=_outbox_show)


def _outbox_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from datetime import UTC

    from sqlalchemy.exc import SQLAlchemyError

    from backjobs.db import session_scope
    from backjobs.outbox_admin import outbox_status

    require_database_file()
    try:
        with session_scope() as session:
            status = outbox_status(session, now=datetime.now(UTC))
    except SQLAlchemyError as exc:
        raise database_unusable(exc, doing="cannot read the outbox") from None
    for name, value in asdict(status).items():
        print(f"{name:<24} {'-' if value is None else value}")
    return 0


def _outbox_retry(args: argparse.Namespace) -> int:
    from datetime import UTC

    from sqlalchemy.exc import SQLAlchemyError

    from backjobs.db import session_scope
    from backjobs.outbox_admin import retry_failed

    log_to_terminal()
    require_database_file()
    try:
        with session_scope() as session:
            now = datetime.now(UTC)
            retried = retry_failed(session, ids=args.ids, failed_since=args.failed_since, now=now)
    except SQLAlchemyError as exc:
        raise database_unusable(exc, doing="cannot retry outbox rows") from None
    if not retried:
        print("no failed outbox rows to retry")
    else:
        print(f"retried {len(retried)} outbox row(s): {', '.join(map(str, retried))}")
    return 0


def _outbox_show(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from backjobs.db import session_scope
    from backjobs.outbox_admin import describe_task

    require_database_file()
    try:
        with session_scope() as session:
            view = describe_task(session, args.id)
    except SQLAlchemyError as exc:
        raise database_unusable(exc, doing="cannot read the outbox") from None
    lines = [
        ("status", view.status),
        ("attempts", f"{view.attempts} of {view.max_attempts}"),
        ("priority", view.priority),
        ("created", view.created_at),
        ("next attempt", view.next_attempt_at),
        ("ended", view.completed_at),
        ("lease until", view.locked_until),
        ("dedup key", view.dedup_key),
        ("last error", view.last_error),
        ("template", view.template),
        ("recipients", ", ".join(view.recipients)),
        ("delivered to", None if view.delivered is None else ", ".join(view.delivered) or "-"),
        ("refused", None if view.refused is None else ", ".join(view.refused) or "-"),
        *((f"context.{key}", _context_value(key, value)) for key, value in view.context.items()),
        *((f"context.{key}", "(sensitive, not shown)") for key in view.omitted),
        ("payload problem", view.payload_error),
    ]
    print(f"outbox row {view.id}")
    for label, value in lines:
        if value is not None:
            print(f"  {label:<16} {value}")
    return 0


def _context_value(key: str, value: Any) -> str:
    # A message body is the mail itself: its size tells ops enough.
    if key == "body" and isinstance(value, str):
        return f"({len(value)} characters, not shown)"
    return _one_line(value)


def _one_line(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"
