"""``backjobs dashboard``: Prefect's server (API, UI, services) behind the gate, one process.

Prefect keeps its own database as Prefect configures it (``PREFECT_HOME``'s SQLite by
default, ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` for PostgreSQL). The UI is told to
call the API through the gate (``PREFECT_UI_API_URL``). Before serving, the settings are
checked and every problem an operator can fix is one line (:class:`DashboardError`).

Local development means listening on the loopback interface only (``127.0.0.1``,
``localhost`` or ``::1``) with a loopback public URL: only there is the development (or a
shorter than 32 bytes) ``BACKJOBS_JWT_SECRET`` tolerated. Behind a proxy the dashboard
listens on loopback, but its public URL (``https://jobs.example.com``) is not: a real
secret is needed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from backjobs.dashboard.gate import DashboardGate
from backjobs.dashboard.tokens import AdminDirectory
from backjobs.models import User
from backjobs.net import PortInUse, bind_port
from backjobs.settings import DEVELOPMENT_JWT_SECRET, Settings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MIN_SECRET_BYTES = 32  # RFC 7518: an HS256 key at least as long as the hash


class DashboardError(RuntimeError):
    """A reason the dashboard cannot start, in one line an operator can act on."""


@dataclass(frozen=True)
class DashboardConfig:
    host: str
    port: int
    public_url: str
    secret: str
    auth_string: str | None
    login_url: str | None
    database_url: str
    admin_cache_seconds: float = 30.0
    session_minutes: int = 480
    max_token_minutes: int = 10080


def dashboard_config(settings: Settings, *, host: str | None, port: int | None) -> DashboardConfig:
    host = host or settings.dashboard_host
    port = settings.dashboard_port if port is None else port
    return DashboardConfig(
        host=host,
        port=port,
        public_url=public_url(settings, host=host, port=port),
        secret=settings.jwt_secret.get_secret_value(),
        auth_string=(
            settings.dashboard_auth_string.get_secret_value()
            if settings.dashboard_auth_string
            else None
        ),
        login_url=settings.dashboard_login_url,
        database_url=settings.database_url,
        admin_cache_seconds=settings.dashboard_admin_cache_seconds,
        session_minutes=settings.dashboard_session_minutes,
        max_token_minutes=settings.dashboard_max_token_minutes,
    )


def public_url(settings: Settings, *, host: str | None = None, port: int | None = None) -> str:
    """Where browsers reach the dashboard: BACKJOBS_DASHBOARD_PUBLIC_URL, else http://HOST:PORT."""
    if settings.dashboard_public_url:
        return settings.dashboard_public_url.rstrip("/")
    host = host or settings.dashboard_host
    port = settings.dashboard_port if port is None else port
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"


def check_secret(config: DashboardConfig) -> None:
    if not config.secret:
        raise DashboardError("BACKJOBS_JWT_SECRET is empty: set a random secret")
    if local_only(config):
        return
    where = config.host if config.host not in LOOPBACK_HOSTS else config.public_url
    if config.secret == DEVELOPMENT_JWT_SECRET:
        raise DashboardError(
            f"BACKJOBS_JWT_SECRET is the development default; set a secret of at least "
            f"{MIN_SECRET_BYTES} bytes to serve {where} (the default is only accepted on "
            "127.0.0.1/localhost with a loopback BACKJOBS_DASHBOARD_PUBLIC_URL)"
        )
    if len(config.secret.encode()) < MIN_SECRET_BYTES:
        raise DashboardError(
            f"BACKJOBS_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes; use a longer "
            f"random secret to serve {where}"
        )


def local_only(config: DashboardConfig) -> bool:
    """Listening on loopback, and browsers reach it on loopback too (no proxy in front)."""
    public_host = urlsplit(config.public_url).hostname or ""
    return config.host in LOOPBACK_HOSTS and public_host in LOOPBACK_HOSTS


def check_prefect_auth_setting() -> None:
    # Prefect's own basic-auth middleware would refuse every admin (they send a JWT) and
    # make the UI ask for a password: the gate checks the machine credential instead.
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise DashboardError(
            "unset PREFECT_SERVER_API_AUTH_STRING for the dashboard: set the machine "
            "credential as BACKJOBS_DASHBOARD_AUTH_STRING (clients keep PREFECT_API_AUTH_STRING)"
        )


def check_app_database(engine: Engine) -> None:
    """The users table must be readable: the gate asks it who is an admin."""
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(select(User.id).limit(1))
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        if "users" in first and ("exist" in first or "no such table" in first):
            raise DashboardError(
                f"the app database {shown} has no users table: run `backjobs db upgrade`"
            ) from None
        raise DashboardError(f"cannot reach the app database {shown}: {first}") from None
    except SQLAlchemyError as exc:
        raise DashboardError(f"cannot reach the app database {shown}: {exc}") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one clear line."""
    try:
        sock = bind_port(
            host, port, host_option="--host", port_option="--port, BACKJOBS_DASHBOARD_PORT"
        )
    except PortInUse as exc:
        raise DashboardError(str(exc)) from None
    sock.set_inheritable(True)
    return sock


def startup_notes(config: DashboardConfig) -> list[str]:
    """What works differently than an operator may expect, said once at start."""
    notes = []
    if config.auth_string is None:
        notes.append(
            "BACKJOBS_DASHBOARD_AUTH_STRING is not set: only admins get in; Prefect "
            "workers and the CLI (PREFECT_API_AUTH_STRING) are refused"
        )
    if config.host in ("0.0.0.0", "::") and "localhost" in config.public_url:
        notes.append(
            f"set BACKJOBS_DASHBOARD_PUBLIC_URL to the address browsers use: the UI calls "
            f"{config.public_url}/api"
        )
    return notes


class NoQueryString(logging.Filter):
    """Drops query strings from log lines (uvicorn's access log and its websocket lines):
    a sign-in link or a websocket handshake may carry a token in its query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_without_query(arg) for arg in record.args)
        if isinstance(record.msg, str) and "?" in record.msg:
            record.msg = QUERY.sub("", record.msg)
        return True


QUERY = re.compile(r"(?<=[^\s?])\?[^\s\"']*")


def _without_query(arg: object) -> object:
    return QUERY.sub("", arg) if isinstance(arg, str) and "?" in arg else arg


def _configure_logs() -> None:
    """Query strings out of every line; the audit trail and the gate's lines at INFO."""
    scrub = NoQueryString()
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn", "backjobs"):
        logging.getLogger(name).addFilter(scrub)
    for handler in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
        handler.addFilter(scrub)
    dashboard = logging.getLogger("backjobs.dashboard")
    dashboard.setLevel(logging.INFO)
    if not dashboard.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(scrub)
        dashboard.addHandler(handler)
        dashboard.propagate = False


def serve_dashboard(config: DashboardConfig, *, engine: Engine) -> None:
    """Check, bind, and serve until SIGINT/SIGTERM. Raises :class:`DashboardError`."""
    check_secret(config)
    check_prefect_auth_setting()
    check_app_database(engine)
    sock = bind_socket(config.host, config.port)
    if local_only(config) and len(config.secret.encode()) < MIN_SECRET_BYTES:
        from jwt.warnings import InsecureKeyLengthWarning

        warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

    # Prefect re-applies its logging config whenever it builds an in-process client, at
    # PREFECT_SERVER_LOGGING_LEVEL (WARNING): keep uvicorn's access log (query strings
    # dropped by NoQueryString) and start-up lines at INFO.
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_UVICORN_LEVEL", "INFO")
    import prefect.settings
    import uvicorn
    from prefect.server.api.server import create_app

    from backjobs.orchestration.webhook_calls import own_transport_per_call

    own_transport_per_call()  # the automations' webhook calls, made by this process
    with prefect.settings.temporary_settings(updates=_prefect_settings(config)):
        prefect_app = create_app(final=True)
        app = gated_app(config, prefect_app=prefect_app, engine=engine)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="info", ws_ping_interval=20, ws_ping_timeout=20)
        )
        _configure_logs()
        logging.getLogger("backjobs.orchestration").setLevel(logging.INFO)
        print(f"backjobs dashboard: serving {config.public_url} (API {config.public_url}/api)")
        for note in startup_notes(config):
            print(f"backjobs dashboard: note: {note}", file=sys.stderr)
        server.run(sockets=[sock])


def _prefect_settings(config: DashboardConfig) -> dict[Any, object]:
    """The UI calls the API through the gate; no analytics unless asked for."""
    import prefect.settings

    updates: dict[Any, object] = {
        prefect.settings.PREFECT_UI_API_URL: f"{config.public_url}/api",
        prefect.settings.PREFECT_UI_URL: config.public_url,
    }
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[prefect.settings.PREFECT_SERVER_ANALYTICS_ENABLED] = False
    return updates


def gated_app(config: DashboardConfig, *, prefect_app: Any, engine: Engine) -> Any:
    """Prefect's app behind the gate, and the automations' alert receiver in front of it.

    The receiver answers ``POST /backjobs/alerts`` itself, with its own check of the
    machine credential (401 to anything else, an admin's token included); every other
    request goes through the gate.
    """
    from backjobs.orchestration.alert_receiver import AlertReceiver
    from backjobs.settings import get_settings

    gate = DashboardGate(
        prefect_app,
        secret=config.secret,
        admins=AdminDirectory(engine, cache_seconds=config.admin_cache_seconds),
        auth_string=config.auth_string,
        public_url=config.public_url,
        login_url=config.login_url,
        session_minutes=config.session_minutes,
        max_token_minutes=config.max_token_minutes,
    )
    return AlertReceiver(
        gate,
        prefect_app=prefect_app,
        auth_string=config.auth_string,
        engine=engine,
        settings=get_settings(),
        public_url=config.public_url,
    )
