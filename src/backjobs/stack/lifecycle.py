"""The local stack: ``backjobs stack up | down | status | env``.

``up`` (idempotent, returns once ready): migrates the app database (SQLite under the
stack folder unless BACKJOBS_DATABASE_URL says otherwise) and, when it is new, fills it
with demo data (:mod:`backjobs.stack.demo_data`); starts ``backjobs dashboard``
(Prefect's server and UI behind the admin gate, on its own SQLite under
``<var>/stack/prefect``); marks runs an earlier stack left Pending/Running as Crashed (so
each deployment's one-at-a-time slot frees); creates the work pool; deploys prefect.yaml
(``backjobs deploy``: exactly the file's schedules); starts one process worker; and
creates one ad hoc run of each job, so the UI has runs to show.

``down`` pauses the worker's pool (so that it takes no new run), lets runs the worker
started end (up to ``wait`` seconds, default 60; ``up`` resumes the pool), stops the
worker (two SIGTERMs, then SIGKILL), marks every run still Pending,
Running or Cancelling as Crashed through the API, stops the dashboard, then any leftover
process of this stack (a flow run the worker left), and waits for the port to be free.
The data stays. Where things live and the stack's secrets: :mod:`backjobs.stack.config
<backjobs.stack.config>`.

The stack folder is ``BACKJOBS_STACK_DIR`` (default ``var``; ``--var-dir`` on the
command line), relative to the working directory.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backjobs.stack import processes
from backjobs.stack.config import DASHBOARD, WORK_POOL, WORKER, Stack, StackError

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
DEFAULT_STOP_WAIT = 60.0  # seconds `down` lets started runs end before stopping the worker
POOL_HELD = "pool-held-by-down"  # in the stack folder: the pool `down` paused, for `up`


def executable(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else name


def _say(message: str) -> None:
    print(message, flush=True)


def up(stack: Stack, *, demo: bool, say: Any = _say) -> dict[str, Any]:
    """Bring the stack up (see the module docstring); what was started."""
    started = time.monotonic()
    stack.folder.mkdir(parents=True, exist_ok=True)
    seeded = prepare_database(stack, demo=demo)
    if seeded:
        say(f"demo data written to {stack.database_url}")
    if processes.running_pid(stack.folder, DASHBOARD) is None:
        processes.check_port_free(stack.host, stack.port)
        address = {"host": stack.host, "port": stack.port}
        (stack.folder / "address.json").write_text(json.dumps(address))
        command = ["dashboard", "--host", stack.host, "--port", str(stack.port)]
        processes.spawn(
            stack.folder,
            DASHBOARD,
            [executable("backjobs"), *command],
            env=stack.child_env(prefect_home="prefect", client=False),
            cwd=stack.project_file.parent,
        )
    _wait_healthy(stack, timeout=300)  # a busy 2-core machine needs minutes
    say(f"dashboard up at {stack.public_url}")
    fresh_worker = processes.running_pid(stack.folder, WORKER) is None
    from backjobs.stack import api as stack_api

    if fresh_worker:
        crashed = stack_api.run(
            stack, stack_api.crash_stuck_runs(reason="left over from an earlier stack")
        )
        if crashed:
            say(f"{crashed} run(s) left Pending/Running by an earlier stack marked Crashed")
    stack_api.run(stack, stack_api.ensure_work_pools(stack))
    resumed = stack_api.run(stack, stack_api.resume_held_work_pool(stack.folder / POOL_HELD))
    if resumed:
        say(f"work pool {resumed} resumed (paused by `stack down` while started runs ended)")
    if fresh_worker:
        # Started before deploying: it boots while `prefect deploy` runs.
        command = ["worker", "start", "--pool", WORK_POOL, "--name", "stack-worker"]
        processes.spawn(
            stack.folder,
            WORKER,
            [executable("prefect"), *command],
            env=stack.child_env(prefect_home="prefect-client", client=True),
            cwd=stack.project_file.parent,
        )
    from backjobs.orchestration.deploy import deploy

    changes = deploy(
        stack.project_file, env=stack.child_env(prefect_home="prefect-client", client=True)
    )
    say(f"deployed {len(changes)} deployments from {stack.project_file}")
    for change in changes.values():
        for line in change.report:  # what changed on the server, re-activations named
            say(f"  {line}")
    stack_api.run(stack, stack_api.wait_worker_online(stack, timeout=300))
    runs = stack_api.run(stack, stack_api.trigger_each(list(changes))) if fresh_worker else []
    return {
        "seeded": seeded,
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }


def prepare_database(stack: Stack, *, demo: bool) -> bool:
    """Migrate the app database; demo data when it is new. True when seeded."""
    from backjobs.db import make_engine
    from backjobs.db.migrate import upgrade_engine
    from backjobs.settings import load_settings
    from backjobs.stack.demo_data import is_empty, seed_demo_data

    if stack.database_url.startswith("sqlite:///"):
        Path(stack.database_url.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    if stack.pickup_dir is not None:
        stack.pickup_dir.mkdir(parents=True, exist_ok=True)
    stack.storage_root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(stack.database_url)
    try:
        upgrade_engine(engine)
        if not demo or not is_empty(engine):
            return False
        settings = load_settings(database_url=stack.database_url, storage_root=stack.storage_root)
        seed_demo_data(engine, now=datetime.now(UTC), settings=settings)
        return True
    finally:
        engine.dispose()


def _wait_healthy(stack: Stack, *, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    # One client for the whole wait: each new client loads the CA bundle (≈ 35 ms of CPU),
    # and a poll every 0.3 s took a second of CPU from the dashboard starting beside it.
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if processes.running_pid(stack.folder, DASHBOARD) is None:
                raise StackError(
                    f"the dashboard stopped while starting: {_log_tail(stack, DASHBOARD)} "
                    f"(log: {stack.folder / 'dashboard.log'})"
                )
            try:
                if client.get(f"{stack.api_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    log = stack.folder / "dashboard.log"
    raise StackError(f"the dashboard is not healthy after {timeout:.0f} s (log: {log})")


def _log_tail(stack: Stack, name: str) -> str:
    try:
        lines = (stack.folder / f"{name}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def down(stack: Stack, *, wait: float = DEFAULT_STOP_WAIT, say: Any = _say) -> None:
    """Stop everything this stack started, after up to ``wait`` seconds for started runs
    to end; runs still unfinished then are marked Crashed."""
    from backjobs.stack import api as stack_api

    server = processes.running_pid(stack.folder, DASHBOARD)
    if server is not None and processes.running_pid(stack.folder, WORKER) is not None:
        _let_runs_finish(stack, wait=wait, say=say)
    if processes.stop(stack.folder, WORKER, grace=5, terms=2):
        say("worker stopped")
    # Flow runs the worker had started: no process may keep running a job unseen.
    processes.sweep(stack.folder, keep={server} if server else set())
    if server is not None:
        try:
            crashed = stack_api.run(
                stack, stack_api.crash_stuck_runs(reason="the local stack was stopped")
            )
        except Exception as exc:  # stopping goes on; `up` marks them later
            say(f"could not mark unfinished runs: {type(exc).__name__}: {exc}")
        else:
            if crashed:
                say(f"{crashed} unfinished run(s) marked Crashed")
    if processes.stop(stack.folder, DASHBOARD, grace=15):
        say("dashboard stopped")
    left = processes.sweep(stack.folder)
    if left:
        say(f"{left} leftover process(es) stopped")
    if server is not None and not processes.wait_port_free(stack.host, stack.port, timeout=15):
        raise StackError(f"port {stack.port} on {stack.host} is still in use after stopping")
    say(f"stack stopped; data kept in {stack.var_dir}")


def _hold_work_pool(stack: Stack, *, say: Any) -> None:
    """The worker takes no new run while ``down`` waits: its pool is paused until the next
    ``up`` (which resumes it). Without this, a run coming due in the wait (email-send-job:
    every 2 minutes) could start in the last second, then be killed with the worker."""
    from backjobs.stack import api as stack_api

    try:
        stack_api.run(stack, stack_api.hold_work_pool(WORK_POOL, stack.folder / POOL_HELD))
    except Exception as exc:  # stopping goes on regardless
        say(f"could not pause work pool {WORK_POOL}: {type(exc).__name__}: {exc}")


def _let_runs_finish(stack: Stack, *, wait: float, say: Any) -> None:
    """Wait (up to ``wait`` s) while runs the worker started are Pending or Running.

    Runs not yet picked up (Scheduled, Late) are not waited for: the next ``up`` runs them.
    """
    from backjobs.stack import api as stack_api

    if wait <= 0:
        return
    _hold_work_pool(stack, say=say)
    deadline = time.monotonic() + wait
    told = False
    while time.monotonic() < deadline:
        try:
            unfinished = stack_api.run(stack, stack_api.unfinished_runs())
        except Exception as exc:  # stopping goes on regardless
            say(f"could not read the runs: {type(exc).__name__}: {exc}")
            return
        if not unfinished:
            return
        if not told:
            say(f"waiting up to {wait:.0f} s for {unfinished} started run(s) to end")
            told = True
        time.sleep(1)
    if told:
        say(f"still unfinished after {wait:.0f} s: stopping anyway")


def status(stack: Stack, *, say: Any = _say) -> bool:
    """Each part up or down, and each deployment's schedules and next run; True if all up."""
    from backjobs.stack import api as stack_api

    parts = {name: processes.running_pid(stack.folder, name) for name in (DASHBOARD, WORKER)}
    for name, pid in parts.items():
        say(f"{name:<10} {'up' if pid else 'down':<5} {f'pid {pid}' if pid else ''}")
    if parts[DASHBOARD] is None:
        return False
    say(f"dashboard  {stack.public_url}")
    for item in stack_api.run(stack, stack_api.deployment_statuses(stack)):
        when = item.next_run.strftime("%Y-%m-%d %H:%M:%S %Z") if item.next_run else "-"
        say(f"  {item.name:<40} {', '.join(item.schedules):<28} next run {when}")
    return all(parts.values())


def sign_in_link(stack: Stack) -> str | None:
    """A one-time sign-in link for the demo admin, or None without one."""
    import warnings

    from backjobs.dashboard.tokens import Purpose, mint_admin_token, sign_in_url
    from backjobs.db import make_engine, session_scope
    from backjobs.stack.demo_data import ADMIN_EMAIL

    engine = make_engine(stack.database_url)
    try:
        with session_scope(engine) as session, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # key-length warnings: the secret is ours
            token = mint_admin_token(
                session,
                email=ADMIN_EMAIL,
                secret=stack.jwt_secret,
                now=datetime.now(UTC),
                minutes=60,
                purpose=Purpose.SIGN_IN,
            )
    except LookupError:
        return None
    finally:
        engine.dispose()
    return sign_in_url(stack.public_url, token)


def print_ready(stack: Stack, report: dict[str, Any], *, say: Any = _say) -> None:
    link = sign_in_link(stack)
    mail = (
        f"into {stack.pickup_dir} (.eml files)"
        if stack.pickup_dir is not None
        else "to the SMTP server of BACKJOBS_SMTP_HOST"
    )
    lines = [
        "",
        f"backjobs stack is up ({report['seconds']} s)",
        f"  dashboard  {stack.public_url}",
        f"  sign in    {link}" if link else
        "  sign in    backjobs dashboard-token <admin email> --url (after the env line below)",
        "             (one-time link, valid 60 min; a new one: "
        "backjobs dashboard-token admin@example.com --url)",
        f"  app db     {stack.database_url}",
        f"  mail       {mail}",
        f"  logs       {stack.folder}/*.log",
        *(f"  ran now    {name}" for name in report["runs"]),
        '  shell      eval "$(.venv/bin/backjobs stack env)"   # prefect / backjobs against it',
        "  stop       ./scripts/stop   (backjobs stack down; the data stays)",
    ]  # fmt: skip
    for line in lines:
        say(line)
