"""Unmodified Prefect clients through the gate with the machine credential.

``prefect deploy`` (one deployment of prefect.yaml), ``prefect deployment run`` and
``prefect worker start`` talk to a gated ``backjobs dashboard`` with only
``PREFECT_API_URL`` and ``PREFECT_API_AUTH_STRING`` set; the run completes and its events
(sent over the gated websocket) reach the server.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from backjobs.db import make_engine
from backjobs.models import RefreshToken
from tests.support.dashboard import PREFECT, ROOT, GatedDashboard, gated_dashboard, migrated_sqlite
from tests.support.prefect_api import call_json

pytestmark = pytest.mark.slow

AS_OF = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def app_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = migrated_sqlite(tmp_path_factory.mktemp("app-db"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (id, email) VALUES (1, 'u@example.com')"))
        for i, expires in enumerate([AS_OF - timedelta(days=1), AS_OF + timedelta(days=1)]):
            conn.execute(
                text(
                    "INSERT INTO refresh_tokens (user_id, token_hash, expires_at) "
                    "VALUES (1, :h, :e)"
                ),
                {"h": f"t{i}", "e": expires.isoformat()},
            )
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, app_db: str) -> Iterator[GatedDashboard]:
    with gated_dashboard(tmp_path_factory.mktemp("dash"), app_db_url=app_db) as d:
        yield d


def prefect(
    dash: GatedDashboard, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFECT, *args],
        cwd=ROOT,
        env=env or dash.prefect_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_deploy_run_and_worker_through_the_gate(
    dash: GatedDashboard, app_db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Without the credential the same client is refused.
    anonymous = dash.prefect_env | {"PREFECT_API_AUTH_STRING": ""}
    refused = prefect(dash, "work-pool", "ls", env=anonymous, timeout=60)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr

    ok(prefect(dash, "work-pool", "create", "--type", "process", "backjobs"))
    ok(prefect(dash, "--no-prompt", "deploy", "--name", "cleanup-job"))
    listed = ok(prefect(dash, "deployment", "ls"))
    assert "cleanup-job/cleanup-job" in listed and "email-send-job" not in listed
    ok(
        prefect(
            dash, "deployment", "run", "cleanup-job/cleanup-job", "-p", f"as_of={AS_OF.isoformat()}"
        )
    )
    worker_env = dash.prefect_env | {
        "BACKJOBS_DATABASE_URL": app_db,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path_factory.mktemp("files")),
        "BACKJOBS_ALLOW_FUTURE_AS_OF": "true",  # AS_OF is a rehearsal date
    }
    ok(prefect(dash, "worker", "start", "--pool", "backjobs", "--run-once", env=worker_env))

    engine = make_engine(app_db)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(RefreshToken)) == 1
    engine.dispose()
    headers = dash.machine_headers()
    cleanup_runs = {"flows": {"name": {"any_": ["cleanup-job"]}}}
    runs = call_json("POST", f"{dash.api}/flow_runs/filter", headers=headers, body=cleanup_runs)
    ran = [r for r in runs if r["state_type"] != "SCHEDULED"]
    assert [r["state_type"] for r in ran] == ["COMPLETED"]
    # Task runs are recorded from the events the flow run sent through the gated
    # /api/events/in websocket.
    flow_run = {"flow_runs": {"id": {"any_": [ran[0]["id"]]}}}
    deadline = time.monotonic() + 120  # events are processed asynchronously
    while time.monotonic() < deadline:
        tasks = call_json("POST", f"{dash.api}/task_runs/filter", headers=headers, body=flow_run)
        if len(tasks) >= 3 and all(t["state_type"] == "COMPLETED" for t in tasks):
            break
        time.sleep(1)
    assert sorted(t["state_type"] for t in tasks) == ["COMPLETED"] * len(tasks)
    assert len(tasks) >= 3, tasks
