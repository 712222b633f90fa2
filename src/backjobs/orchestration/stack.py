"""The local stack: ``backjobs stack up | down | status | env``.

``up`` (idempotent, returns once ready): migrates the app database (SQLite under the
stack folder unless BACKJOBS_DATABASE_URL says otherwise) and, when it is new, fills it
with demo data (:mod:`backjobs.orchestration.demo_data`); starts ``backjobs dashboard``
(Prefect's server and UI behind the admin gate, on its own SQLite under
``<var>/stack/prefect``); marks runs an earlier stack left Pending/Running as Crashed (so
each deployment's one-at-a-time slot frees); creates the work pool; deploys prefect.yaml
(``backjobs deploy``: exactly the file's schedules); starts one process worker; and
creates one ad hoc run of each job, so the UI has runs to show.

``down`` stops the worker (two SIGTERMs, then SIGKILL), marks every run still Pending,
Running or Cancelling as Crashed through the API, stops the dashboard, then any leftover
process of this stack (a flow run the worker left), and waits for the port to be free.
The data stays. Secrets of the stack (the JWT secret, the machine credential) are made
once, kept in ``<var>/stack/secrets.json`` (mode 600) unless BACKJOBS_JWT_SECRET /
BACKJOBS_DASHBOARD_AUTH_STRING are set, and printed only by ``stack env``.

The stack folder is ``BACKJOBS_STACK_DIR`` (default ``var``; ``--var-dir`` on the
command line), relative to the working directory.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backjobs.orchestration import processes
from backjobs.settings import EmailTransportKind, Settings

DASHBOARD, WORKER = "dashboard", "worker"
WORK_POOL = "backjobs"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
STUCK = ("PENDING", "RUNNING", "CANCELLING")


class StackError(RuntimeError):
    """Why the stack cannot do what was asked, in one line."""


@dataclass(frozen=True)
class Stack:
    var_dir: Path
    project_file: Path
    host: str
    port: int
    public_url: str
    database_url: str
    storage_root: Path
    pickup_dir: Path | None  # None: mail goes to the configured SMTP server
    jwt_secret: str
    auth_string: str

    @property
    def folder(self) -> Path:
        return self.var_dir / "stack"

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/api"

    def app_env(self) -> dict[str, str]:
        """The BACKJOBS_* every part of the stack (and a shell using it) needs."""
        env = {
            "BACKJOBS_STACK_DIR": str(self.var_dir),
            "BACKJOBS_PROJECT_DIR": str(self.project_file.parent),
            "BACKJOBS_DATABASE_URL": self.database_url,
            "BACKJOBS_STORAGE_ROOT": str(self.storage_root),
            "BACKJOBS_DASHBOARD_HOST": self.host,
            "BACKJOBS_DASHBOARD_PORT": str(self.port),
            "BACKJOBS_JWT_SECRET": self.jwt_secret,
            "BACKJOBS_DASHBOARD_AUTH_STRING": self.auth_string,
        }
        if self.pickup_dir is not None:
            env["BACKJOBS_EMAIL_PICKUP_DIR"] = str(self.pickup_dir)
        return env

    def client_env(self) -> dict[str, str]:
        """What ``prefect`` and ``backjobs`` need to reach the stack's server."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_AUTH_STRING": self.auth_string,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "backjobs",
        }

    def child_env(self, *, prefect_home: str, client: bool) -> dict[str, str]:
        # The shell's PREFECT_* (another server, a profile) must not leak into the stack;
        # its BACKJOBS_* (SMTP, …) do reach the worker.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= self.app_env() | {
            "PREFECT_HOME": str(self.folder / prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        return env | self.client_env() | {"PREFECT_WORKER_QUERY_SECONDS": "5"} if client else env


def load_stack(settings: Settings, *, var_dir: str | Path | None, project_file: Path) -> Stack:
    """The stack's configuration: settings, with paths under the stack folder by default."""
    chosen = settings.model_fields_set
    var = Path(var_dir or settings.stack_dir).expanduser().resolve()
    database_url = settings.database_url
    if "database_url" not in chosen:
        database_url = f"sqlite:///{var / 'backjobs.db'}"
    storage = settings.storage_root if "storage_root" in chosen else var / "files"
    pickup: Path | None = None
    if settings.email_transport is EmailTransportKind.PICKUP:
        pickup = settings.email_pickup_dir if "email_pickup_dir" in chosen else var / "mail"
        pickup = pickup.resolve()
    kept = _secrets(var / "stack")
    jwt_secret = kept["jwt_secret"]
    if "jwt_secret" in chosen:
        jwt_secret = settings.jwt_secret.get_secret_value()
    auth = kept["auth_string"]
    if settings.dashboard_auth_string is not None:
        auth = settings.dashboard_auth_string.get_secret_value()
    from backjobs.orchestration.dashboard_server import public_url

    host, port = settings.dashboard_host, settings.dashboard_port
    # `down`, `status` and `env` address the stack where `up` started it, even from a
    # shell without the BACKJOBS_DASHBOARD_* that `up` had.
    started = _started_address(var / "stack")
    if started and "dashboard_host" not in chosen:
        host = str(started["host"])
    if started and "dashboard_port" not in chosen:
        port = int(started["port"])
    return Stack(
        var_dir=var,
        project_file=project_file.resolve(),
        host=host,
        port=port,
        public_url=public_url(settings, host=host, port=port),
        database_url=database_url,
        storage_root=storage.resolve(),
        pickup_dir=pickup,
        jwt_secret=jwt_secret,
        auth_string=auth,
    )


def _started_address(folder: Path) -> dict[str, Any] | None:
    if processes.running_pid(folder, DASHBOARD) is None:
        return None
    try:
        address: dict[str, Any] = json.loads((folder / "address.json").read_text())
    except (OSError, ValueError):
        return None
    return address


def _secrets(folder: Path) -> dict[str, str]:
    path = folder / "secrets.json"
    try:
        kept: dict[str, str] = json.loads(path.read_text())
        return kept
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    kept = {
        "jwt_secret": secrets.token_hex(32),
        "auth_string": f"backjobs-stack:{secrets.token_hex(24)}",
    }
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(kept, out)
    return kept


def env_lines(stack: Stack) -> list[str]:
    """``export`` lines for ``eval "$(backjobs stack env)"``."""
    import shlex

    values = stack.app_env() | stack.client_env()
    return [f"export {key}={shlex.quote(value)}" for key, value in sorted(values.items())]


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
    from backjobs.orchestration import stack_api

    if fresh_worker:
        crashed = stack_api.run(
            stack, stack_api.crash_stuck_runs(reason="left over from an earlier stack")
        )
        if crashed:
            say(f"{crashed} run(s) left Pending/Running by an earlier stack marked Crashed")
    stack_api.run(stack, stack_api.ensure_work_pools(stack))
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
    from backjobs.orchestration.demo_data import is_empty, seed_demo_data
    from backjobs.settings import load_settings

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
    while time.monotonic() < deadline:
        if processes.running_pid(stack.folder, DASHBOARD) is None:
            raise StackError(
                f"the dashboard stopped while starting: {_log_tail(stack, DASHBOARD)} "
                f"(log: {stack.folder / 'dashboard.log'})"
            )
        try:
            if httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200:
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


def down(stack: Stack, *, say: Any = _say) -> None:
    """Stop everything this stack started; runs left unfinished are marked Crashed."""
    from backjobs.orchestration import stack_api

    server = processes.running_pid(stack.folder, DASHBOARD)
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


def status(stack: Stack, *, say: Any = _say) -> bool:
    """Each part up or down, and each deployment's schedules and next run; True if all up."""
    from backjobs.orchestration import stack_api

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

    from backjobs.db import make_engine, session_scope
    from backjobs.orchestration.demo_data import ADMIN_EMAIL
    from backjobs.orchestration.tokens import mint_admin_token, sign_in_url

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
