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
Output read by a program that stops reading (``backjobs … | head``) ends the command
quietly, with status 141 as for a Unix tool killed by SIGPIPE: it is not an error of
backjobs, and said as one it hid the lines the reader did want.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from backjobs.cli.common import DatabaseUnusable, UsageError, database_unusable, first_line
from backjobs.cli.dashboard import add_dashboard_commands
from backjobs.cli.db import add_db_commands
from backjobs.cli.jobs import add_job_commands
from backjobs.cli.outbox import add_outbox_commands
from backjobs.cli.stack import add_stack_commands
from backjobs.settings import SettingsError

DEBUG_FLAG = "--debug"
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # --debug is global and accepted anywhere, so it can be added to any command line.
    debug = DEBUG_FLAG in words
    args = _parser().parse_args([w for w in words if w != DEBUG_FLAG])
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a pipe's output is buffered
    except BrokenPipeError:
        # Python's exit would flush stdout into the closed pipe again and print that.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS
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
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    if isinstance(exc, DatabaseUnusable):
        return str(exc), exc.code
    if isinstance(exc, SettingsError | UsageError | LookupError | ValueError):
        return str(exc), 2
    if isinstance(exc, ArgumentError):
        return f"BACKJOBS_DATABASE_URL is not a usable database URL: {exc}", 2
    if isinstance(exc, SQLAlchemyError):
        unusable = database_unusable(exc)
        return str(unusable), unusable.code
    if isinstance(exc, CommandError):
        return f"migration failed: {first_line(exc)}", 1
    unreachable = _prefect_unreachable(exc)
    if unreachable:
        return unreachable, 1
    return f"{type(exc).__name__}: {first_line(exc)}", 1


def _prefect_unreachable(exc: BaseException) -> str | None:
    """The Prefect server could not be reached or did not answer (an httpx transport error
    from Prefect's client): the line names the server's URL."""
    httpx = sys.modules.get("httpx")  # loaded if the error can be one of its own
    if httpx is None or not isinstance(exc, httpx.TransportError):
        return None
    url = os.environ.get("PREFECT_API_URL") or "(PREFECT_API_URL unset)"
    return (
        f"the Prefect server at {url} cannot be reached ({type(exc).__name__}: "
        f"{first_line(exc) or 'no answer'}): check PREFECT_API_URL and that the server is running"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backjobs",
        description="Run, trigger, deploy and watch the application's background jobs.",
    )
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="on an error, show the traceback (any position)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add_commands in (
        add_db_commands,
        add_job_commands,
        add_dashboard_commands,
        add_stack_commands,
        add_outbox_commands,
    ):
        add_commands(commands)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
