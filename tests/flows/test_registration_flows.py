"""The registration jobs as Prefect runs them (flows and tasks), and as an operator runs
them (``backjobs run`` in a process of its own against a SQLite file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL

from backjobs.jobs.expire_unconfirmed_registrations import ExpireUnconfirmedRegistrationsResult
from backjobs.jobs.pending_users_reminder import PendingUsersReminderResult
from flows.expire_unconfirmed_registrations import expire_unconfirmed_registrations_job
from flows.pending_users_reminder import pending_users_reminder_job
from tests.support.databases import Database
from tests.support.registration import add_user, queued, users_by_email

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[2]
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
# A run of today: a warning's link must outlive the real time of sending.
AS_OF = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)


def seed(db: Database) -> None:
    """An admin, one user waiting for approval, one registration expiring, one expired."""
    long_ago = AS_OF - timedelta(days=60)
    add_user(db, "boss@example.com", created_at=long_ago, status="approved", is_admin=True)
    add_user(db, "waiting@example.com", created_at=long_ago, confirmed_at=AS_OF - timedelta(days=4))
    add_user(db, "soon@example.com", created_at=AS_OF - timedelta(days=6))
    add_user(db, "gone@example.com", created_at=AS_OF - timedelta(days=8))


def table_of(flow_run_id: object, key: str) -> list[dict[str, str]]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    table: list[dict[str, str]] = json.loads(str({a.key: a.data for a in found}[key]))
    return table


def test_both_flows_run_their_parts_and_publish_the_counts(app_env: Database) -> None:
    seed(app_env)
    state = expire_unconfirmed_registrations_job(as_of=AS_OF, return_state=True)
    assert (state.type.value, state.name) == ("COMPLETED", "Completed")  # nothing left undone
    assert state.result() == ExpireUnconfirmedRegistrationsResult(
        warned=1, declined=1, declined_unwarned=1
    )
    table = table_of(state.state_details.flow_run_id, "expire-unconfirmed-registrations-job-result")
    assert {"count": "warned", "value": "1"} in table
    assert {"count": "declined", "value": "1"} in table

    reminder = pending_users_reminder_job(as_of=AS_OF + timedelta(hours=1), return_state=True)
    assert reminder.state_details.flow_run_id is not None
    assert reminder.result() == PendingUsersReminderResult(
        users_listed=1, emails_enqueued=1, admin_recipients=1
    )
    table = table_of(reminder.state_details.flow_run_id, "pending-users-reminder-job-result")
    assert {"count": "users_listed", "value": "1"} in table
    # The two parts run concurrently: their emails come in either order.
    assert sorted(e["template"] for e in queued(app_env)) == [
        "pending_users_reminder",
        "registration_expired",
        "registration_expiry_warning",
    ]
    # The same as_of again (a retry, a manual re-run): nothing new.
    assert expire_unconfirmed_registrations_job(as_of=AS_OF).warned == 0
    assert pending_users_reminder_job(as_of=AS_OF + timedelta(hours=1)).users_listed == 0
    assert len(queued(app_env)) == 3


def test_backjobs_run_takes_flow_and_seed_names(sqlite_db: Database, tmp_path: Path) -> None:
    seed(sqlite_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "BACKJOBS_DATABASE_URL": sqlite_db.url,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BACKJOBS_ALLOW_FUTURE_AS_OF": "true",  # the reminder runs an hour after today's AS_OF
    }

    def backjobs(*args: str) -> subprocess.CompletedProcess[str]:
        command = [BACKJOBS, "run", *args, "--project-dir", str(ROOT)]
        return subprocess.run(
            command, cwd=Path.cwd(), env=env, capture_output=True, text=True, timeout=180
        )

    done = backjobs("ExpireUnconfirmedRegistrationsJob", "--as-of", AS_OF.isoformat())
    assert done.returncode == 0, done.stderr
    assert "expire-unconfirmed-registrations-job: completed" in done.stdout
    assert "warned                       1" in done.stdout
    assert "declined                     1" in done.stdout
    reminder_at = (AS_OF + timedelta(hours=1)).isoformat()
    done = backjobs("pending-users-reminder-job", "--as-of", reminder_at)
    assert done.returncode == 0, done.stderr
    assert "users_listed                 1" in done.stdout
    users = users_by_email(sqlite_db)
    assert users["gone@example.com"].registration_status == "declined"
    assert users["soon@example.com"].expiry_warning_sent_at == AS_OF
    assert users["waiting@example.com"].pending_reminder_sent_at == AS_OF + timedelta(hours=1)
    assert len(queued(sqlite_db)) == 3
