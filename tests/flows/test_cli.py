"""``backjobs`` as an operator types it: a real process against a real Prefect server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL

from tests.support.databases import Database
from tests.support.seeding import cleanup_counts as counts
from tests.support.seeding import seed_cleanup as seed
from tests.support.seeding import seed_invalid_recurring

ROOT = Path(__file__).resolve().parents[2]
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))


def backjobs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # From the test's own folder (no developer .env), the project named explicitly.
    if args[0] in ("run", "trigger"):
        args = (*args, "--project-dir", str(ROOT))
    return subprocess.run(
        [BACKJOBS, *args], cwd=Path.cwd(), env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def cli_env(app_env: Database, prefect_harness: None, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "BACKJOBS_DATABASE_URL": app_env.url,
        "BACKJOBS_STORAGE_ROOT": str(tmp_path / "files"),
        # The test's Prefect server: spares each process a temporary server of its own.
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return env


def test_run_cleanup_prints_the_counts(app_env: Database, cli_env: dict[str, str]) -> None:
    seed(app_env, Path(cli_env["BACKJOBS_STORAGE_ROOT"]))
    done = backjobs("run", "CleanupJob", "--as-of", "2030-01-01T00:00:00Z", env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "refresh_tokens_deleted       2" in done.stdout
    assert "orphaned_files_removed       2" in done.stdout
    assert "outbox_rows_deleted          2" in done.stdout
    assert counts(app_env) == (1, 1, 1)


def test_a_failed_part_exits_non_zero_and_is_named(
    app_env: Database, cli_env: dict[str, str]
) -> None:
    seed(app_env, Path(cli_env["BACKJOBS_STORAGE_ROOT"]), stuck=True)
    done = backjobs("run", "cleanup-job", "--as-of", "2030-01-01T00:00:00Z", env=cli_env)
    assert done.returncode == 1
    assert "1 of 4 parts failed: remove_orphaned_files" in done.stderr
    assert "remove_orphaned_files: 1 stored object(s) could not be removed" in done.stderr
    assert counts(app_env) == (1, 1, 2)


def test_an_unknown_job_lists_the_known_ones(cli_env: dict[str, str]) -> None:
    done = backjobs("run", "NoSuchJob", env=cli_env)
    assert done.returncode == 2
    assert "unknown job 'NoSuchJob'" in done.stderr and "cleanup-job (CleanupJob)" in done.stderr


def test_a_bad_setting_stops_the_run_with_its_name(cli_env: dict[str, str]) -> None:
    done = backjobs("run", "cleanup-job", env=cli_env | {"BACKJOBS_DELETE_BATCH_SIZE": "-1"})
    assert done.returncode == 2
    assert "BACKJOBS_DELETE_BATCH_SIZE" in done.stderr


def test_db_upgrade_migrates_an_empty_database(tmp_path: Path) -> None:
    env = dict(os.environ, BACKJOBS_DATABASE_URL=f"sqlite:///{tmp_path}/fresh/app.db")
    done = backjobs("db", "upgrade", env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fresh" / "app.db").stat().st_size > 0
    assert "is at head" in done.stdout


def test_run_refuses_an_as_of_in_the_future_naming_the_setting(
    app_env: Database, cli_env: dict[str, str]
) -> None:
    seed(app_env, Path(cli_env["BACKJOBS_STORAGE_ROOT"]))
    env = {k: v for k, v in cli_env.items() if k != "BACKJOBS_ALLOW_FUTURE_AS_OF"}
    future = (datetime.now(UTC) + timedelta(days=7, hours=1)).isoformat()
    done = backjobs("run", "cleanup-job", "--as-of", future, env=env)
    assert done.returncode == 1
    assert "7 days in the future" in done.stderr
    assert "BACKJOBS_ALLOW_FUTURE_AS_OF=true" in done.stderr
    assert counts(app_env) == (3, 3, 3)  # nothing deleted


def test_run_sends_the_domains_warnings_to_the_runs_logs(
    app_env: Database, cli_env: dict[str, str]
) -> None:
    # The variable a worker or shell might lack is not set: the run must not depend on it.
    assert "PREFECT_LOGGING_EXTRA_LOGGERS" not in cli_env
    seed_invalid_recurring(app_env, amount="1.0000")
    done = backjobs(
        "run", "ProcessRecurringTransactionsJob", "--as-of", "2026-03-01T00:05:00Z", env=cli_env
    )
    assert done.returncode == 0, done.stderr
    run_id = re.search(r"flow run ([0-9a-f-]{36})", done.stdout)
    assert run_id, done.stdout
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id[1])]))
        )
    warned = [log.message for log in logs if "Skipping recurring transaction 1" in log.message]
    assert warned and "interval" in warned[0], [log.message for log in logs]
