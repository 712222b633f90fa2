"""The ``backjobs`` command.

    backjobs db upgrade                       migrate the configured database
    backjobs run <job> [--as-of ISO-8601]     run a job's flow now, in this process
    backjobs trigger <job> [--as-of] [--wait [--timeout S]]
                                              create a run of the job's deployment
    backjobs deployments check [FILE]         validate prefect.yaml
    backjobs deploy [FILE]                    deploy prefect.yaml: exactly its schedules
    backjobs stack up|down|status|env         the local stack: server, worker, demo data
    backjobs dashboard [--host] [--port]      the Prefect server and UI behind the admin gate
    backjobs dashboard-token EMAIL [--minutes M] [--url]
                                              a short-lived admin token, or a sign-in link
    backjobs outbox status                    the email outbox's counts
    backjobs outbox retry --id N… | --failed-since ISO   failed rows back to pending
    backjobs outbox show N                    one outbox row (never its secrets)

``<job>`` is the flow name (``cleanup-job``) or the seed's name (``CleanupJob``). Jobs are
found through prefect.yaml's entrypoints, as a worker finds them, so prefect.yaml stays
the one list of jobs and the installed package never imports ``flows/``.

Errors are one line on stderr saying what is wrong and what to do — exit status 2 for a
usage error (a bad argument or setting), 1 for anything else; ``--debug`` (anywhere on
the line) adds the traceback. :func:`main` is the one place that turns errors into lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from backjobs.settings import SettingsError

DEBUG_FLAG = "--debug"


class UsageError(Exception):
    """The command line asks for something that cannot be: exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # --debug is global and accepted anywhere, so it can be added to any command line.
    debug = DEBUG_FLAG in words
    args = _parser().parse_args([w for w in words if w != DEBUG_FLAG])
    try:
        code: int = args.handler(args)
    except Exception as exc:
        message, code = explain_error(exc)
        if debug:
            traceback.print_exc()
        hint = "" if debug or code == 2 else f" (run again with {DEBUG_FLAG} for the traceback)"
        print(f"backjobs: error: {message}{hint}", file=sys.stderr)
    return code


def explain_error(exc: BaseException) -> tuple[str, int]:
    """One line for ``exc`` (what is wrong, what to do) and the exit status."""
    from alembic.util import CommandError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    if isinstance(exc, SettingsError | UsageError | LookupError | ValueError):
        return str(exc), 2
    if isinstance(exc, ArgumentError):
        return f"BACKJOBS_DATABASE_URL is not a usable database URL: {exc}", 2
    if isinstance(exc, DBAPIError):
        reason = _first_line(exc.orig) if exc.orig is not None else _first_line(exc)
        return (
            f"database {_database_shown()}: {reason} — check BACKJOBS_DATABASE_URL and that "
            "the database server is running and reachable",
            1,
        )
    if isinstance(exc, CommandError):
        return f"migration failed: {_first_line(exc)}", 1
    return f"{type(exc).__name__}: {_first_line(exc)}", 1


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _database_shown() -> str:
    from backjobs.db import normalize_url
    from backjobs.settings import get_settings

    try:
        return normalize_url(get_settings().database_url).render_as_string(hide_password=True)
    except Exception:
        return "(BACKJOBS_DATABASE_URL)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backjobs",
        description="Run, trigger, deploy and watch the application's background jobs.",
    )
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="on an error, show the traceback (any position)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate the configured database")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(handler=_db_upgrade)

    run = commands.add_parser("run", help="run a job's flow now, in this process")
    run.add_argument("job", help="flow name (cleanup-job) or seed name (CleanupJob)")
    run.add_argument("--as-of", type=parse_as_of, help="the job's clock, ISO-8601 (default now)")
    run.add_argument("--project-dir", help="folder of prefect.yaml (default: found upwards)")
    run.set_defaults(handler=_run)

    trigger = commands.add_parser(
        "trigger",
        help="create a run of the job's deployment on the Prefect server (a worker runs it)",
    )
    trigger.add_argument("job", help="flow name (cleanup-job) or seed name (CleanupJob)")
    trigger.add_argument(
        "--as-of", type=parse_as_of, help="the job's clock (default: the run's time)"
    )
    trigger.add_argument(
        "--wait",
        action="store_true",
        help="check a worker polls the pool, follow the run, print its counts; "
        "non-zero if it does not complete",
    )
    trigger.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long"
    )
    trigger.add_argument("--project-dir", help="folder of prefect.yaml (default: found upwards)")
    trigger.set_defaults(handler=_trigger)

    deployments = commands.add_parser("deployments", help="prefect.yaml deployments")
    dep_commands = deployments.add_subparsers(dest="dep_command", required=True, metavar="ACTION")
    check = dep_commands.add_parser("check", help="validate prefect.yaml")
    check.add_argument("file", nargs="?", help="path of prefect.yaml (default: found upwards)")
    check.set_defaults(handler=_deployments_check)

    # The other commands live beside this module; imported here, as they import it.
    from backjobs.cli_outbox import add_outbox_commands
    from backjobs.cli_server import add_server_commands

    add_server_commands(commands)
    add_outbox_commands(commands)
    return parser


def parse_as_of(value: str, *, option: str = "--as-of") -> datetime:
    """ISO-8601; ``Z`` accepted; a value without offset is UTC."""
    from backjobs.orchestration.jobbase import to_utc

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} {value!r} is not an ISO-8601 date-time (e.g. 2030-01-01T00:00:00Z)"
        ) from None
    try:
        return to_utc(parsed)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is outside years 1-9999 once converted to UTC"
        ) from None


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


def _run(args: argparse.Namespace) -> int:
    from backjobs.settings import get_settings

    get_settings()  # fail on a bad setting before starting Prefect
    prefect_defaults()
    _ensure_prefect_home()  # before Prefect is imported: it makes its home on import

    from backjobs.orchestration.jobbase import result_rows
    from backjobs.orchestration.prefect_yaml import find_project_file, load_job_flow

    project_file = find_project_file(args.project_dir)
    job = load_job_flow(project_file, args.job)
    state = job(as_of=args.as_of, return_state=True)
    if not state.is_completed():
        print(
            f"{job.name}: run {state.name} (flow run {state.state_details.flow_run_id}): "
            f"{state.message}",
            file=sys.stderr,
        )
        error = state.result(raise_on_failure=False)
        for part in getattr(error, "exceptions", ()):
            print(f"  {part}", file=sys.stderr)
        return 1
    result: Any = state.result()
    print(f"{job.name}: completed (flow run {state.state_details.flow_run_id})")
    for row in result_rows(result):
        print(f"  {row['count']:<28} {row['value']}")
    return 0


def _ensure_prefect_home() -> None:
    """Without PREFECT_API_URL, Prefect runs a server in-process with its SQLite in
    PREFECT_HOME (default ``~/.prefect``), and fails with a traceback when that folder
    cannot be made (a service account whose HOME does not exist): make it, or say why not.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"without PREFECT_API_URL, Prefect keeps this run's records in {home}, which cannot "
            f"be created ({exc.strerror}): set PREFECT_HOME to a writable folder, or "
            "PREFECT_API_URL to a Prefect server"
        ) from None


def _trigger(args: argparse.Namespace) -> int:
    """Deployments are named after their flow: ``cleanup-job/cleanup-job``."""
    from backjobs.orchestration.prefect_yaml import find_deployment, find_project_file

    deployment = find_deployment(find_project_file(args.project_dir), args.job)
    if not os.environ.get("PREFECT_API_URL"):
        raise LookupError("set PREFECT_API_URL to the Prefect server that holds the deployments")
    if args.timeout is not None and not args.wait:
        raise ValueError("--timeout needs --wait")
    prefect_defaults()
    from backjobs.orchestration.trigger import trigger_deployment

    return trigger_deployment(
        str(deployment["name"]), as_of=args.as_of, wait=args.wait, timeout=args.timeout
    )


def _deployments_check(args: argparse.Namespace) -> int:
    from backjobs.orchestration.prefect_yaml import check_project_file, find_project_file

    path = find_project_file(None) if args.file is None else args.file
    problems = check_project_file(path)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{path}: ok")
    return 0


def prefect_defaults() -> None:
    """Environment defaults for a command that talks to Prefect, before it imports Prefect."""
    # Offline machines: no telemetry. (Domain logs reach the run's logs through the job
    # base, which attaches Prefect's API handler itself: by now Prefect may have been
    # imported and PREFECT_LOGGING_EXTRA_LOGGERS would be read too late.)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "backjobs")


if __name__ == "__main__":
    raise SystemExit(main())
