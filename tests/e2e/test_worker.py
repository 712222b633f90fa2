"""End to end: a real Prefect server, ``prefect deploy --all`` from prefect.yaml, a worker.

This is what production does: deployments with their cron schedules on a process work
pool, a run triggered ad hoc, picked up and executed by ``prefect worker start``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backjobs.models import RefreshToken, User
from tests.support.databases import Database
from tests.support.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

AS_OF = datetime(2030, 1, 1, tzinfo=UTC)


def test_deploy_all_then_a_worker_runs_a_triggered_cleanup(
    prefect_server: PrefectServer, sqlite_db: Database, tmp_path: Path
) -> None:
    with sqlite_db.session() as s:
        user = User(email="e2e@example.com")
        s.add(user)
        s.flush()
        for i, expires in enumerate([AS_OF - timedelta(days=1), AS_OF + timedelta(days=1)]):
            s.add(RefreshToken(user_id=user.id, token_hash=f"e2e{i}", expires_at=expires))
        s.commit()
    env = {
        "BACKJOBS_DATABASE_URL": sqlite_db.url,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path / "files"),
        # A rehearsal on a test rig: 2030 is in the future.
        "BACKJOBS_ALLOW_FUTURE_AS_OF": "true",
    }
    server = prefect_server
    server.prefect("work-pool", "create", "--type", "process", "backjobs")
    server.prefect("--no-prompt", "deploy", "--all")
    listed = server.prefect("deployment", "ls")
    for name in ("cleanup-job/cleanup-job", "email-send-job/email-send-job"):
        assert name in listed
    inspected = server.prefect("deployment", "inspect", "cleanup-job/cleanup-job")
    assert "0 23 * * *" in inspected and "'timezone': 'UTC'" in inspected

    triggered = server.backjobs("trigger", "CleanupJob", "--as-of", AS_OF.isoformat(), env=env)
    assert triggered.returncode == 0, triggered.stderr
    assert "cleanup-job/cleanup-job: flow run" in triggered.stdout
    server.prefect("worker", "start", "--pool", "backjobs", "--run-once", env=env)

    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(RefreshToken)) == 1
    ran = [r for r in server.flow_runs("cleanup-job") if r["state_type"] != "SCHEDULED"]
    assert [r["state_type"] for r in ran] == ["COMPLETED"]
    assert ran[0]["parameters"] == {"as_of": AS_OF.isoformat()}
