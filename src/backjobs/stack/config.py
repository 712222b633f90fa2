"""The local stack's configuration: where it lives, its addresses and its secrets.

:func:`load_stack` reads the settings and puts what is not set under the stack folder
(``BACKJOBS_STACK_DIR``, default ``var``): the app database ``<var>/backjobs.db``, files
``<var>/files``, picked-up mail ``<var>/mail``. Secrets of the stack (the JWT secret, the
machine credential) are made once, kept in ``<var>/stack/secrets.json`` (mode 600) unless
BACKJOBS_JWT_SECRET / BACKJOBS_DASHBOARD_AUTH_STRING are set, and printed only by
``stack env`` (:func:`env_lines`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backjobs.settings import EmailTransportKind, Settings
from backjobs.stack import processes

DASHBOARD, WORKER = "dashboard", "worker"
WORK_POOL = "backjobs"
# What only the dashboard holds: workers and flow runs never receive these.
SERVER_SECRETS = ("BACKJOBS_JWT_SECRET", "BACKJOBS_DASHBOARD_AUTH_STRING")


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
        """The environment of the dashboard (``client=False``) or of a Prefect client.

        The shell's PREFECT_* (another server, a profile) must not leak into the stack;
        its BACKJOBS_* (SMTP, …) do reach the worker. A client (the worker, and so every
        flow run; ``deploy``) gets only the machine credential, as PREFECT_API_AUTH_STRING:
        never the JWT secret (with it, a run could mint admin tokens) nor
        BACKJOBS_DASHBOARD_AUTH_STRING.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= self.app_env() | {
            "PREFECT_HOME": str(self.folder / prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        if not client:
            return env
        for server_only in SERVER_SECRETS:
            env.pop(server_only, None)
        return env | self.client_env() | CLIENT_PATIENCE


CLIENT_PATIENCE = {
    "PREFECT_WORKER_QUERY_SECONDS": "5",
    # The stack's server is SQLite by default, which answers a write that meets another
    # 503; Prefect's client retries five times (2 + 4 + … + 32 s), and a burst of runs on
    # a busy machine outlasted that: the worker gave up submitting a run, which Prefect
    # marked Crashed (a failure alert for nothing). Eight retries wait up to ≈ 8 min.
    "PREFECT_CLIENT_MAX_RETRIES": "8",
}


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
    from backjobs.dashboard.server import public_url

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
