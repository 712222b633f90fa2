"""EmailSendJob across processes: a sender killed mid-batch, two senders at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backjobs.jobs.email_send import EmailSendResult
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.smtp import SmtpServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 20  # seconds, on the real clock; renewed (every LEASE/3) by a live sender, not a killed one


def run(db: Database, *, now: datetime = NOW) -> EmailSendResult:
    return drain(db, now=now)


def enqueue_many(db: Database, n: int) -> list[int]:
    context = {"subject": "Batch", "body": "Hello"}
    with db.session() as s:
        ids = [
            enqueue_email(
                s, to=f"user{i}@example.com", template="generic", context=context, now=NOW
            )
            for i in range(n)
        ]
        s.commit()
    return ids


def sender(now: datetime = NOW) -> subprocess.Popen[str]:
    """A sender process with this test's settings (the environment, as a worker has it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.email_sender", now.isoformat()],
        cwd=Path.cwd(),  # the test's own folder: no developer .env
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def statuses(db: Database) -> Counter[str]:
    with db.session() as s:
        rows = s.execute(select(AppTask.status, func.count()).group_by(AppTask.status))
        return Counter({status: count for status, count in rows})


def expected_ids(db: Database, ids: list[int]) -> set[str]:
    with db.session() as s:
        payloads = s.execute(select(AppTask.payload).where(AppTask.id.in_(ids))).scalars()
        return {str(payload["message_id"]) for payload in payloads if payload is not None}


def test_killed_sender_leaves_leased_rows_that_the_next_run_sends(
    smtp_env: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"BATCH_SIZE": "10", "CONNECTIONS": "2", "LEASE_SECONDS": str(LEASE)}.items():
        monkeypatch.setenv(f"BACKJOBS_EMAIL_{key}", value)
    get_settings.cache_clear()
    ids = enqueue_many(smtp_env, 40)
    smtp_server.handler.data_delay = 0.05
    process = sender()
    deadline = time.monotonic() + 30
    while len(smtp_server.messages) < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGKILL
    smtp_server.handler.data_delay = 0
    left = statuses(smtp_env)
    assert left["processing"] > 0 and left["pending"] > 0
    # Before the lease runs out (real clock) nobody touches the leased rows.
    killed_at = time.monotonic()
    assert run(smtp_env, now=NOW).sent == left["pending"]
    # The killed run last renewed at most LEASE/3 before the kill: else this proves nothing.
    assert time.monotonic() - killed_at < LEASE * 2 / 3
    assert statuses(smtp_env)["processing"] == left["processing"]
    time.sleep(max(0.0, LEASE + 0.5 - (time.monotonic() - killed_at)))
    after_lease = run(smtp_env, now=NOW)
    assert after_lease.sent == left["processing"]
    assert statuses(smtp_env) == Counter(completed=40)
    received = Counter(smtp_server.message_ids())
    assert set(received) == expected_ids(smtp_env, ids)
    # A resend (a message the killed run had sent but not acknowledged) keeps its id.
    assert sum(received.values()) - 40 <= left["processing"]


@pytest.mark.postgres
def test_two_senders_on_postgres_send_each_message_once(
    pg_db: Database, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BACKJOBS_DATABASE_URL", pg_db.url)
    monkeypatch.setenv("BACKJOBS_EMAIL_TRANSPORT", "smtp")
    monkeypatch.setenv("BACKJOBS_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("BACKJOBS_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("BACKJOBS_EMAIL_FROM", "jobs@backjobs.test")
    monkeypatch.setenv("BACKJOBS_EMAIL_BATCH_SIZE", "50")
    get_settings.cache_clear()
    ids = enqueue_many(pg_db, 2000)
    processes = [sender(), sender()]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(result["sent"] for result in results) == 2000
    assert all(result["sent"] > 0 for result in results), results  # both took part
    received = Counter(smtp_server.message_ids())
    assert set(received) == expected_ids(pg_db, ids)
    assert max(received.values()) == 1
    assert statuses(pg_db) == Counter(completed=2000)
