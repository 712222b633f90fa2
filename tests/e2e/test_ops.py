"""What ops see, end to end: one Prefect server, prefect.yaml deployed, a worker as the
README starts it (no PREFECT_LOGGING_EXTRA_LOGGERS in its environment).

The tests share the server, the deployments and the app database, and run in file
order: the first two need no worker polling yet; the module's worker starts in the late
runs test and serves the rest.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backjobs.db import make_engine
from tests.support.databases import Database
from tests.support.prefect_server import PrefectServer
from tests.support.seeding import CLEANUP_AS_OF, seed_cleanup, seed_invalid_recurring

pytestmark = pytest.mark.slow

POOL = "backjobs"


@dataclass
class Deployed:
    server: PrefectServer
    db: Database
    env: dict[str, str]  # the app's BACKJOBS_* settings, as the pool's workers get them


@pytest.fixture(scope="module")
def deployed(
    prefect_server: PrefectServer,
    sqlite_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    folder = tmp_path_factory.mktemp("ops-app")
    shutil.copyfile(sqlite_template, folder / "app.db")
    url = f"sqlite:///{folder / 'app.db'}"
    engine = make_engine(url)
    env = {
        "BACKJOBS_DATABASE_URL": url,
        "BACKJOBS_STORAGE_ROOT": str(folder / "files"),
        "BACKJOBS_EMAIL_PICKUP_DIR": str(folder / "mail"),
        # The cleanup rehearsal below replays 2030 (seeding's date): a test rig.
        "BACKJOBS_ALLOW_FUTURE_AS_OF": "true",
    }
    prefect_server.create_pool(POOL)
    prefect_server.prefect("--no-prompt", "deploy", "--all")
    yield Deployed(prefect_server, Database("sqlite", url, engine), env)
    prefect_server.stop_workers()
    engine.dispose()


def start_worker(deployed: Deployed) -> None:
    if not deployed.server.online_workers(POOL):
        deployed.server.start_worker(POOL, env=deployed.env)


def run_id_in(output: str) -> str:
    found = re.search(r"flow run \S+ \(([0-9a-f-]{36})\)", output)
    assert found, output
    return found[1]


def test_trigger_wait_says_at_once_that_no_worker_polls(deployed: Deployed) -> None:
    assert not deployed.server.online_workers(POOL)
    started = time.monotonic()
    done = deployed.server.backjobs("trigger", "cleanup-job", "--wait", env=deployed.env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no worker polls work pool 'backjobs'" in done.stderr
    assert "prefect worker start --pool backjobs" in done.stderr
    assert time.monotonic() - started < 30
    runs = deployed.server.flow_runs("cleanup-job")
    assert all(r["state_type"] == "SCHEDULED" and r["auto_scheduled"] for r in runs)


def test_late_runs_collapse_to_at_most_one(deployed: Deployed) -> None:
    server = deployed.server
    deployment = server.api("deployments/name/cleanup-job/cleanup-job")
    now = datetime.now(UTC)
    ids = []
    for minutes in range(10, 0, -1):  # ten runs, 10 … 1 minutes late, no worker polling
        late = (now - timedelta(minutes=minutes)).isoformat()
        run = server.api(
            f"deployments/{deployment['id']}/create_flow_run",
            {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": late}}},
        )
        ids.append(run["id"])
    start_worker(deployed)
    runs = server.wait_until_final(ids, timeout=120)
    states = sorted(r["state_type"] for r in runs.values())
    assert states.count("COMPLETED") <= 1, states
    cancelled = [r for r in runs.values() if r["state_type"] != "COMPLETED"]
    assert len(cancelled) >= 9, states
    for run in cancelled:
        assert run["state_type"] == "CANCELLED", states
        assert run["state"]["message"] == "Deployment concurrency limit reached."


def test_a_worker_run_shows_the_domains_warnings_and_trigger_wait_its_counts(
    deployed: Deployed,
) -> None:
    seed_invalid_recurring(deployed.db, amount="5.0000")
    start_worker(deployed)
    done = deployed.server.backjobs(
        "trigger",
        "ProcessRecurringTransactionsJob",
        "--as-of",
        "2026-03-01T00:05:00+00:00",
        "--wait",
        "--timeout",
        "120",
        env=deployed.env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Progress (state changes), then the counts of the run's result artifact.
    # Progress, then the end (a quick run may pass Running between two polls).
    progress = r"s  (Scheduled|Pending|Submitting|Running)\n.*s  Completed with problems\n"
    assert re.search(progress, done.stdout, re.S), done.stdout
    assert re.search(r"invalid\s+1\n", done.stdout), done.stdout
    assert "process-recurring-transactions-job: completed with problems (run " in done.stdout
    assert "invalid=1" in done.stdout
    run_id = run_id_in(done.stdout)
    warning = wait_for_log(deployed.server, run_id, "Skipping recurring transaction")
    assert warning["name"] == "backjobs.jobs.recurring_transactions"
    assert "interval 0 is below 1" in warning["message"]


def test_trigger_wait_names_the_failed_part_with_counts_and_one_traceback(
    deployed: Deployed,
) -> None:
    seed_cleanup(deployed.db, Path(deployed.env["BACKJOBS_STORAGE_ROOT"]), stuck=True)
    start_worker(deployed)
    done = deployed.server.backjobs(
        "trigger",
        "cleanup-job",
        "--as-of",
        CLEANUP_AS_OF.isoformat(),
        "--wait",
        "--timeout",
        "120",
        env=deployed.env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"refresh_tokens_deleted\s+2\n", done.stdout), done.stdout
    assert re.search(r"orphaned_files_removed\s+2\n", done.stdout), done.stdout
    assert "failed parts: remove_orphaned_files" in done.stderr
    assert re.search(r"1 of \d parts failed: remove_orphaned_files", done.stderr)
    run_id = run_id_in(done.stdout)
    wait_for_log(deployed.server, run_id, "Job failed with error")
    logs = deployed.server.logs_of(run_id)
    tracebacks = [log for log in logs if "Traceback (most recent call last)" in log["message"]]
    assert len(tracebacks) == 1, [log["message"][:200] for log in tracebacks]
    assert "could not be removed" in tracebacks[0]["message"]


def test_trigger_wait_gives_up_after_its_timeout(deployed: Deployed) -> None:
    start_worker(deployed)
    done = deployed.server.backjobs(
        "trigger", "cleanup-job", "--wait", "--timeout", "0.5", env=deployed.env
    )
    assert done.returncode == 4, done.stdout + done.stderr
    assert "after 0.5 s; the run goes on" in done.stderr


def wait_for_log(server: PrefectServer, run_id: str, text: str) -> dict[str, str]:
    # The flow's process sends its last logs as it exits, just after the final state.
    deadline = time.monotonic() + 90  # a loaded CI machine is slow
    while True:
        found = [log for log in server.logs_of(run_id) if text in log["message"]]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            messages = [log["message"][:120] for log in server.logs_of(run_id)]
            pytest.fail(f"no log with {text!r} in run {run_id}: {messages}")
        time.sleep(1)
