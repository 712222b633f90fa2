"""A real gated dashboard (``backjobs dashboard`` as a subprocess) for tests, and its tokens.

    with gated_dashboard(tmp, app_db_url=url) as dash:
        httpx.get(f"{dash.url}/api/flows/", headers=dash.machine_headers())
        dash.token("1")               # an HS256 admin token for user id 1
        dash.prefect_env              # env for unmodified Prefect clients (machine credential)

Each server has its own PREFECT_HOME (its own SQLite) and a free port; its output goes to
``dash.log_path``. The app database must be migrated; :func:`migrated_sqlite` makes one.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from backjobs.db import make_engine
from backjobs.db.migrate import upgrade_engine
from tests.support.prefect_api import clean_env, free_port, healthy
from tests.support.prefect_server import SEEDED_HOME_ENV, seed_prefect_home, terminate

ROOT = Path(__file__).resolve().parents[2]
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
SECRET = "test-dashboard-secret-" + "0123456789abcdef" * 3  # 64 bytes: no key-length warning
AUTH_STRING = "worker:test-machine-credential"


def migrated_sqlite(folder: Path) -> str:
    """The URL of a fresh, migrated SQLite app database in ``folder``."""
    url = f"sqlite:///{folder / 'app.db'}"
    engine = make_engine(url)
    upgrade_engine(engine)
    engine.dispose()
    return url


def make_token(
    sub: str,
    *,
    secret: str = SECRET,
    minutes: float = 60,
    algorithm: str = "HS256",
    extra: Mapping[str, object] | None = None,
) -> str:
    now = datetime.now(UTC)
    claims: dict[str, object] = {
        "sub": sub,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=minutes)).timestamp()),
        **(extra or {}),
    }
    return jwt.encode(claims, secret, algorithm=algorithm)


def unsigned_token(sub: str) -> str:
    """A token with ``alg: none`` and no signature, as an attacker would forge it."""

    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    exp = int((datetime.now(UTC) + timedelta(minutes=60)).timestamp())
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': sub, 'exp': exp})}."


def basic(auth_string: str) -> str:
    return "Basic " + base64.b64encode(auth_string.encode()).decode()


@dataclass
class GatedDashboard:
    url: str
    port: int
    log_path: Path
    prefect_env: dict[str, str]  # PREFECT_API_URL + PREFECT_API_AUTH_STRING, own HOME
    process: subprocess.Popen[bytes]
    server_env: dict[str, str] | None = None  # the dashboard process's own environment

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    @property
    def ws_api(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api"

    def token(self, sub: str, **kwargs: object) -> str:
        return make_token(sub, **kwargs)  # type: ignore[arg-type]

    def machine_headers(self) -> dict[str, str]:
        return {"Authorization": basic(AUTH_STRING)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def dashboard_env(
    home: Path, *, app_db_url: str, port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    return clean_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        "BACKJOBS_DATABASE_URL": app_db_url,
        "BACKJOBS_JWT_SECRET": SECRET,
        "BACKJOBS_DASHBOARD_AUTH_STRING": AUTH_STRING,
        "BACKJOBS_DASHBOARD_PORT": str(port),
        **(extra or {}),
    }


@contextmanager
def gated_dashboard(
    folder: Path,
    *,
    app_db_url: str,
    extra_env: Mapping[str, str] | None = None,
    startup_timeout: float = 300,  # ≈ 6 s idle; a busy machine can be far slower
) -> Iterator[GatedDashboard]:
    """``backjobs dashboard`` on a free port, healthy; terminated on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    seed_prefect_home(folder / "prefect-home")
    env = SEEDED_HOME_ENV | dashboard_env(
        folder / "prefect-home", app_db_url=app_db_url, port=port, extra=extra_env
    )
    log_path = folder / "dashboard.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [BACKJOBS, "dashboard"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    dash = GatedDashboard(
        url=url,
        port=port,
        log_path=log_path,
        prefect_env=clean_env()
        | {
            "PREFECT_HOME": str(folder / "client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"{url}/api",
            "PREFECT_API_AUTH_STRING": AUTH_STRING,
        },
        process=process,
        server_env=env,
    )
    try:
        _wait_healthy(dash, startup_timeout)
        yield dash
    finally:
        terminate(dash.process)


def restart_dashboard(dash: GatedDashboard, *, startup_timeout: float = 300) -> None:
    """Stop the dashboard (SIGTERM) and start it again: same port, home and settings."""
    terminate(dash.process)
    with dash.log_path.open("ab") as log:
        dash.process = subprocess.Popen(
            [BACKJOBS, "dashboard"],
            cwd=dash.log_path.parent,
            env=dash.server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _wait_healthy(dash, startup_timeout)


def _wait_healthy(dash: GatedDashboard, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dash.process.poll() is not None:
            raise AssertionError(f"backjobs dashboard exited early:\n{dash.log()}")
        if healthy(dash.api):
            return
        time.sleep(0.3)
    raise AssertionError(f"backjobs dashboard not healthy after {timeout} s:\n{dash.log()}")
