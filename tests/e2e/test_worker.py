"""End to end: a real Prefect server, ``prefect deploy --all`` from prefect.yaml, a worker.

This is what production does: deployments with their cron schedules on a process work
pool, a run triggered ad hoc, picked up and executed by ``prefect worker start``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backjobs.models import RefreshToken, User
from tests.support.databases import Database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
AS_OF = datetime(2030, 1, 1, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server of its own (own PREFECT_HOME, SQLite); the env to reach it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BACKJOBS_"))}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240  # a busy shared machine needs minutes
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Prefect server did not become healthy in 240 s")
        yield env
    finally:
        process.terminate()
        process.wait(timeout=30)


def prefect(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_deploy_all_then_a_worker_runs_a_triggered_cleanup(
    server: dict[str, str], sqlite_db: Database, tmp_path: Path
) -> None:
    with sqlite_db.session() as s:
        user = User(email="e2e@example.com")
        s.add(user)
        s.flush()
        for i, expires in enumerate([AS_OF - timedelta(days=1), AS_OF + timedelta(days=1)]):
            s.add(RefreshToken(user_id=user.id, token_hash=f"e2e{i}", expires_at=expires))
        s.commit()
    env = server | {
        "BACKJOBS_DATABASE_URL": sqlite_db.url,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path / "files"),
    }
    prefect("work-pool", "create", "--type", "process", "backjobs", env=env)
    prefect("--no-prompt", "deploy", "--all", env=env)
    listed = prefect("deployment", "ls", env=env)
    for name in ("cleanup-job/cleanup-job", "email-send-job/email-send-job"):
        assert name in listed
    inspected = prefect("deployment", "inspect", "cleanup-job/cleanup-job", env=env)
    assert "0 23 * * *" in inspected and "'timezone': 'UTC'" in inspected

    triggered = subprocess.run(
        [BACKJOBS, "trigger", "CleanupJob", "--as-of", AS_OF.isoformat()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert triggered.returncode == 0, triggered.stderr
    assert "cleanup-job/cleanup-job: flow run" in triggered.stdout
    prefect("worker", "start", "--pool", "backjobs", "--run-once", env=env, timeout=180)

    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(RefreshToken)) == 1
    runs = api(env, "flow_runs/filter", {"flows": {"name": {"any_": ["cleanup-job"]}}})
    ran = [r for r in runs if r["state_type"] != "SCHEDULED"]
    assert [r["state_type"] for r in ran] == ["COMPLETED"]
    assert ran[0]["parameters"] == {"as_of": AS_OF.isoformat()}


def api(env: dict[str, str], path: str, body: dict[str, object]) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]
