"""``backjobs dashboard | dashboard-token | deploy | stack``: the commands around the server.

The Prefect server and UI behind the admin gate, tokens and sign-in links for it, deploying
prefect.yaml, and the local stack. Their logic is in :mod:`backjobs.orchestration`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from backjobs.cli import prefect_defaults
from backjobs.orchestration.stack import DEFAULT_STOP_WAIT


def add_server_commands(commands: Any) -> None:
    """The commands of this module on the ``backjobs`` parser's subcommands."""
    _add_dashboard_commands(commands)
    _add_stack_commands(commands)


def _add_dashboard_commands(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="serve the Prefect server and UI behind the admin-only gate"
    )
    dashboard.add_argument("--host", help="interface (default BACKJOBS_DASHBOARD_HOST, 127.0.0.1)")
    dashboard.add_argument("--port", type=int, help="port (default BACKJOBS_DASHBOARD_PORT, 4200)")
    dashboard.set_defaults(handler=_dashboard)

    token = commands.add_parser(
        "dashboard-token", help="a short-lived dashboard token for an admin, or a sign-in link"
    )
    token.add_argument("email", help="the admin's email in the app's users table")
    token.add_argument(
        "--minutes", type=int, help="lifetime (default BACKJOBS_DASHBOARD_TOKEN_MINUTES, 60)"
    )
    token.add_argument("--url", action="store_true", help="print a one-time sign-in link")
    token.set_defaults(handler=_dashboard_token)


def _dashboard(args: argparse.Namespace) -> int:
    from backjobs.db import make_engine
    from backjobs.orchestration.dashboard_server import (
        DashboardError,
        dashboard_config,
        serve_dashboard,
    )
    from backjobs.settings import get_settings

    settings = get_settings()
    prefect_defaults()
    # The server process has no flow run to send its own logs to.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    config = dashboard_config(settings, host=args.host, port=args.port)
    engine = make_engine(config.database_url)
    try:
        serve_dashboard(config, engine=engine)
    except DashboardError as exc:
        print(f"backjobs dashboard: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def _dashboard_token(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from backjobs.orchestration.dashboard_server import public_url
    from backjobs.orchestration.tokens import admin_token, sign_in_url
    from backjobs.settings import get_settings

    settings = get_settings()
    if args.minutes is not None and not 1 <= args.minutes <= 7 * 24 * 60:
        raise ValueError("--minutes must be between 1 and 10080 (a week)")
    try:
        token = admin_token(args.email, settings=settings, minutes=args.minutes)
    except SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
        raise LookupError(
            f"cannot read the users of the app database ({first}); is BACKJOBS_DATABASE_URL "
            "right and migrated (backjobs db upgrade)?"
        ) from None
    print(sign_in_url(public_url(settings), token) if args.url else token)
    return 0


def _add_stack_commands(commands: Any) -> None:
    deploy = commands.add_parser(
        "deploy", help="deploy prefect.yaml so the server holds exactly its schedules"
    )
    deploy.add_argument("file", nargs="?", help="path of prefect.yaml (default: found upwards)")
    deploy.set_defaults(handler=_deploy)

    stack = commands.add_parser("stack", help="the local stack: server, worker, deployments")
    actions = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("up", "start (or complete) the stack and return once it is ready"),
        ("down", "stop every process of the stack; the data stays"),
        ("status", "each part up or down, each deployment's next run"),
        ("env", 'export lines for a shell: eval "$(backjobs stack env)"'),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--var-dir", help="the stack's folder (default BACKJOBS_STACK_DIR, ./var)"
        )
        action.add_argument("--project-dir", help="folder of prefect.yaml (default: found upwards)")
        action.set_defaults(handler=_stack)
        if name == "up":
            action.add_argument("--no-demo", action="store_true", help="no demo data on a new DB")
        if name == "down":
            action.add_argument(
                "--wait",
                type=_seconds,
                default=DEFAULT_STOP_WAIT,
                metavar="SECONDS",
                help="let started runs end first, up to this long (default 60; 0: stop now)",
            )


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds: {value!r}")
    return seconds


def _deploy(args: argparse.Namespace) -> int:
    from backjobs.orchestration.deploy import DeployError, deploy
    from backjobs.orchestration.prefect_yaml import find_project_file

    if not os.environ.get("PREFECT_API_URL"):
        raise LookupError("set PREFECT_API_URL to the Prefect server to deploy to")
    prefect_defaults()
    path = find_project_file(args.file)
    try:
        changes = deploy(path)
    except DeployError as exc:
        print(f"backjobs deploy: {exc}", file=sys.stderr)
        return 1
    for name, change in changes.items():
        print(
            f"{name}/{name}: schedules {change.created} created, {change.updated} updated, "
            f"{change.deleted} deleted, {change.unchanged} unchanged"
        )
    return 0


def _stack(args: argparse.Namespace) -> int:
    from backjobs.orchestration import stack, stack_config
    from backjobs.orchestration.deploy import DeployError
    from backjobs.orchestration.prefect_yaml import find_project_file
    from backjobs.orchestration.processes import PortInUse
    from backjobs.settings import get_settings

    prefect_defaults()
    try:
        project_file = find_project_file(args.project_dir)
    except LookupError:
        if args.stack_command in ("up", "status"):
            raise
        project_file = Path.cwd() / "prefect.yaml"  # env and down do not read it
    settings = get_settings()
    config = stack_config.load_stack(settings, var_dir=args.var_dir, project_file=project_file)
    try:
        if args.stack_command == "env":
            print("\n".join(stack_config.env_lines(config)))
        elif args.stack_command == "status":
            return 0 if stack.status(config) else 1
        elif args.stack_command == "down":
            stack.down(config, wait=args.wait)
        else:
            stack.print_ready(config, stack.up(config, demo=not args.no_demo))
    except (stack_config.StackError, PortInUse, DeployError) as exc:
        print(f"backjobs stack {args.stack_command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
