"""``backjobs run | trigger | deployments check``: one job, in this process or on the server."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backjobs.cli.common import (
    UsageError,
    parse_as_of,
    prefect_defaults,
    require_prefect_server,
)


def add_job_commands(commands: Any) -> None:
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

    deploy = commands.add_parser(
        "deploy", help="deploy prefect.yaml so the server holds exactly its schedules"
    )
    deploy.add_argument("file", nargs="?", help="path of prefect.yaml (default: found upwards)")
    deploy.set_defaults(handler=_deploy)


def _run(args: argparse.Namespace) -> int:
    from backjobs.db.migrate import check_ready
    from backjobs.settings import get_settings

    # Up front, before Prefect starts: a bad setting, a database that is unreachable,
    # missing (never created here) or not migrated is one line, not a failed run.
    check_ready(get_settings().database_url)
    from backjobs.orchestration.prefect_yaml import (
        find_deployment,
        find_project_file,
        load_job_flow,
    )

    project_file = find_project_file(args.project_dir)
    deployment = find_deployment(project_file, args.job)  # a typo: refused before Prefect
    prefect_defaults()
    _ensure_prefect_home()  # before Prefect is imported: it makes its home on import

    from backjobs.orchestration.jobbase import result_rows

    job = load_job_flow(project_file, deployment)
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
    # "completed", or "completed with problems" and the counts of work left undone.
    print(f"{job.name}: {state.name.lower()} (flow run {state.state_details.flow_run_id})")
    if state.name != "Completed" and state.message:
        print(f"  {state.message}")
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
    if args.as_of is not None:
        _refuse_a_future_as_of(args.as_of)
    if not os.environ.get("PREFECT_API_URL"):
        raise _no_server("set PREFECT_API_URL to the Prefect server that holds the deployments")
    if args.timeout is not None and not args.wait:
        raise ValueError("--timeout needs --wait")
    prefect_defaults()
    require_prefect_server()
    from backjobs.orchestration.trigger import trigger_deployment

    return trigger_deployment(
        str(deployment["name"]), as_of=args.as_of, wait=args.wait, timeout=args.timeout
    )


def _no_server(said: str) -> LookupError:
    """No PREFECT_API_URL: when the local stack of this folder is up (``backjobs stack up``
    from here, or BACKJOBS_STACK_DIR), the refusal names the command that points the shell
    at it, as the developer who started it and opened a new shell needs. Only a hint: a
    setting or a stack folder that cannot be read leaves the refusal as it is."""
    from backjobs.settings import SettingsError, get_settings
    from backjobs.stack.config import DASHBOARD
    from backjobs.stack.processes import running_pid

    try:
        var = get_settings().stack_dir.expanduser().resolve()
        up = running_pid(var / "stack", DASHBOARD) is not None
    except (SettingsError, OSError, RuntimeError):  # RuntimeError: pathlib's symlink loop
        up = False
    if not up:
        return LookupError(said)
    # The command as this shell ran it (.venv/bin/backjobs when it is not on PATH).
    program = sys.argv[0] if Path(sys.argv[0]).name == "backjobs" else "backjobs"
    return LookupError(
        f"{said}: the local stack in {var} is up, and "
        f'eval "$({shlex.quote(program)} stack env)" points this shell at it'
    )


def _refuse_a_future_as_of(as_of: datetime) -> None:
    """The job base's rule, applied before any run exists: a run refused on the worker
    would stay in the history as Failed."""
    from backjobs.settings import get_settings

    prefect_defaults()
    from backjobs.clock import FutureAsOfRefused, check_as_of

    allowed = get_settings().allow_future_as_of
    try:
        check_as_of(as_of, now=datetime.now(UTC), allow_future=allowed)
    except FutureAsOfRefused as exc:
        raise UsageError(
            f"not triggered: {exc} (and here, where you trigger); no run was created"
        ) from None


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


def _deploy(args: argparse.Namespace) -> int:
    from backjobs.orchestration.deploy import DeployError, deploy
    from backjobs.orchestration.prefect_yaml import find_project_file

    if not os.environ.get("PREFECT_API_URL"):
        raise _no_server("set PREFECT_API_URL to the Prefect server to deploy to")
    prefect_defaults()
    require_prefect_server()
    path = find_project_file(args.file)
    try:
        changes = deploy(path)
    except DeployError as exc:
        print(f"backjobs deploy: {exc}", file=sys.stderr)
        return 1
    for change in changes.values():
        for line in change.report:
            print(line)
    return 0
