"""EmailSendJob through a real Postfix: ``backjobs run email-send-job`` as an operator runs it.

The job's process gets only ``BACKJOBS_*`` settings (and the test run's shared Prefect server);
Postfix is a private loopback-only instance (``tests/support/postfix.py``), installed on
demand when the machine allows it, delivering ``example.test`` into Maildirs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import NamedTuple

import pytest
from sqlalchemy import select

from backjobs.db import session_scope
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import load_settings
from tests.support.databases import Database
from tests.support.postfix import Postfix
from tests.support.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

ADMIN = "admin@example.test"
UNKNOWN = "nobody@example.test"
SENDER = "jobs@backjobs.test"
# Queued a day before the run: the Date: header must be the time of sending.
QUEUED_AT = datetime.now(UTC) - timedelta(days=1)


class Row(NamedTuple):
    status: str
    attempts: int
    last_error: str | None
    message_id: str


class Run(NamedTuple):
    code: int
    output: str
    started: datetime
    ended: datetime


def enqueue(db: Database, *, to: list[str], subject: str) -> int:
    with session_scope(db.engine) as session:
        context = {"subject": subject, "body": f"{subject}, through Postfix."}
        return enqueue_email(
            session,
            to=to,
            template="generic",
            context=context,
            now=QUEUED_AT,
            settings=load_settings(email_from=SENDER),  # as the app that queues it
        )


def row(db: Database, task_id: int) -> Row:
    with session_scope(db.engine) as session:
        task = session.execute(select(AppTask).where(AppTask.id == task_id)).scalar_one()
        payload = task.payload or {}
        return Row(task.status, task.attempts, task.last_error, str(payload["message_id"]))


def run_email_send_job(
    server: PrefectServer, db: Database, postfix: Postfix, *, trust_cert: bool = True
) -> Run:
    env = {
        "BACKJOBS_DATABASE_URL": db.url,
        "BACKJOBS_EMAIL_TRANSPORT": "smtp",
        "BACKJOBS_EMAIL_FROM": SENDER,
        "BACKJOBS_SMTP_HOST": postfix.host,
        "BACKJOBS_SMTP_PORT": str(postfix.port),
        "BACKJOBS_SMTP_SECURITY": "starttls",
        "BACKJOBS_SMTP_TLS_SERVER_NAME": postfix.server_name,
        "BACKJOBS_SMTP_TIMEOUT_SECONDS": "20",
    }
    if trust_cert:
        env["BACKJOBS_SMTP_CA_FILE"] = str(postfix.cert)
    started = datetime.now(UTC)
    done = server.backjobs("run", "email-send-job", env=env)
    return Run(done.returncode, done.stdout + done.stderr, started, datetime.now(UTC))


def test_starttls_delivers_each_email_with_its_message_id_and_date(
    sqlite_db: Database, postfix: Postfix, shared_prefect_server: PrefectServer
) -> None:
    ids = [enqueue(sqlite_db, to=[ADMIN], subject=f"Report {n}") for n in (1, 2)]
    run = run_email_send_job(shared_prefect_server, sqlite_db, postfix)
    assert run.code == 0, run.output
    received = postfix.wait_for_mail("admin", count=2)
    rows = [row(sqlite_db, task_id) for task_id in ids]
    assert [r.status for r in rows] == ["completed", "completed"]
    by_id = {str(message["Message-ID"]): message for message in received}
    assert sorted(by_id) == sorted(r.message_id for r in rows)
    for number, r in enumerate(rows, start=1):
        message = by_id[r.message_id]
        assert message["Subject"] == f"Report {number}"
        assert message["Date"] is not None  # Postfix adds none of its own (see support)
        sent_at = parsedate_to_datetime(str(message["Date"]))
        assert run.started - timedelta(seconds=1) <= sent_at <= run.ended
        # Postfix writes "with ESMTPS" when the session was encrypted.
        assert "with ESMTPS" in str(message["Received"]), message["Received"]


def test_an_unknown_recipient_is_refused_with_550_and_named(
    sqlite_db: Database, postfix: Postfix, shared_prefect_server: PrefectServer
) -> None:
    both = enqueue(sqlite_db, to=[ADMIN, UNKNOWN], subject="To both")
    unknown_only = enqueue(sqlite_db, to=[UNKNOWN], subject="To nobody")
    run = run_email_send_job(shared_prefect_server, sqlite_db, postfix)
    assert run.code == 0, run.output
    [received] = postfix.wait_for_mail("admin", count=1)
    delivered = row(sqlite_db, both)
    assert str(received["Message-ID"]) == delivered.message_id
    assert delivered.status == "completed"
    assert delivered.last_error is not None
    assert f"{UNKNOWN}: 550" in delivered.last_error
    failed = row(sqlite_db, unknown_only)
    assert failed.status == "failed"
    assert failed.last_error is not None
    assert f"{UNKNOWN}: 550" in failed.last_error
    assert "User unknown" in failed.last_error  # Postfix's own reason, kept


def test_an_untrusted_certificate_fails_the_run_and_uses_no_attempt(
    sqlite_db: Database, postfix: Postfix, shared_prefect_server: PrefectServer
) -> None:
    ids = [enqueue(sqlite_db, to=[ADMIN], subject=f"Held {n}") for n in (1, 2)]
    run = run_email_send_job(shared_prefect_server, sqlite_db, postfix, trust_cert=False)
    assert run.code != 0, run.output
    assert "CERTIFICATE_VERIFY_FAILED" in run.output
    rows = [row(sqlite_db, task_id) for task_id in ids]
    assert [(r.status, r.attempts) for r in rows] == [("pending", 0), ("pending", 0)]
