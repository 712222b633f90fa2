"""``backjobs stack up | down | status | env``: the local stack. The logic is in
:mod:`backjobs.stack`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from backjobs.cli.common import prefect_defaults
from backjobs.stack.lifecycle import DEFAULT_STOP_WAIT


def add_stack_commands(commands: Any) -> None:
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


def _stack(args: argparse.Namespace) -> int:
    from backjobs.net import PortInUse
    from backjobs.orchestration.deploy import DeployError
    from backjobs.orchestration.prefect_yaml import find_project_file
    from backjobs.settings import get_settings
    from backjobs.stack import config as stack_config
    from backjobs.stack import lifecycle as stack

    prefect_defaults()
    try:
        project_file = find_project_file(args.project_dir)
    except LookupError:
        if args.stack_command in ("up", "status"):
            raise
        project_file = Path.cwd() / "prefect.yaml"  # env and down do not read it
    settings = get_settings()
    if args.stack_command != "up":
        # Only `up` makes a stack: the others must not leave a folder and secrets behind
        # for a mistyped --var-dir.
        var = Path(args.var_dir or settings.stack_dir).expanduser()
        if not (var / "stack").is_dir():
            where = f"no stack in {var.absolute()} (`backjobs stack up` makes one there)"
            if args.stack_command == "down":
                print(f"{where}; nothing to stop")
                return 0
            print(f"backjobs stack {args.stack_command}: error: {where}", file=sys.stderr)
            return 1
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
