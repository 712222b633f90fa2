"""BACKJOBS_SMTP_TIMEOUT_SECONDS bounds a message's whole SMTP exchange, not each reply.

A real aiosmtpd server answers every step (EHLO, MAIL, RCPT, the end of DATA) just under
the timeout. Before, each reply had its own timeout and one message took four of them;
now the exchange ends within one timeout and the row is left as the fault rules say: an
outage before DATA hands it back untried, a cut during DATA retries it (the server may
have it). SQLite only: the transport is what is under test, the row rules run on both
databases in test_email_send.py and test_email_faults.py.
"""

from __future__ import annotations

import time

import pytest

from backjobs.jobs.email_send import EmailSendResult, EmailServerUnavailable
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.outbox_mail import enqueue, real_now, row
from tests.support.smtp import SmtpServer

pytestmark = pytest.mark.parametrize("db", ["sqlite"], indirect=True)

TIMEOUT = 1.5  # BACKJOBS_SMTP_TIMEOUT_SECONDS
JUST_UNDER = 1.3  # each step's answer: under the timeout, four of them far over it
MARGIN = 1.0  # the run's own database work, on a loaded machine
TIMED_OUT = f"timed out (BACKJOBS_SMTP_TIMEOUT_SECONDS: {TIMEOUT:g} s"


@pytest.fixture(autouse=True)
def short_timeout(smtp_env: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKJOBS_SMTP_TIMEOUT_SECONDS", str(TIMEOUT))
    monkeypatch.setenv("BACKJOBS_EMAIL_CONNECTIONS", "1")
    get_settings.cache_clear()


def timed_drain(db: Database) -> tuple[EmailSendResult | EmailServerUnavailable, float]:
    started = time.monotonic()
    try:
        outcome: EmailSendResult | EmailServerUnavailable = drain(db, now=real_now())
    except EmailServerUnavailable as exc:
        outcome = exc
    return outcome, time.monotonic() - started


def test_a_server_slow_at_every_step_is_cut_at_one_timeout_before_data(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    """EHLO and MAIL each just under the timeout: the deadline falls at MAIL (an outage)."""
    smtp_server.slow_steps(JUST_UNDER)
    task_id = enqueue(smtp_env, "a@example.com")
    failed, elapsed = timed_drain(smtp_env)
    assert TIMEOUT <= elapsed <= TIMEOUT + MARGIN, elapsed  # before: 4 x 1.3 s, delivered
    assert isinstance(failed, EmailServerUnavailable), failed
    where = f"{smtp_server.host}:{smtp_server.port}"
    assert str(failed).startswith(
        f"email transport unavailable: SMTP server {where}: {TIMED_OUT}"
    ), failed
    # The server's fault: handed back untried, no attempt used, nothing delivered.
    task = row(smtp_env, task_id)
    assert (task.status, task.attempts, task.locked_until, task.last_error) == (
        "pending",
        0,
        None,
        None,
    )
    assert failed.partial_result.released == 1
    assert smtp_server.messages == []


def test_a_cut_during_data_is_retried_as_a_message_that_may_have_arrived(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    """Quick up to DATA, then the final reply later than the time left: cut mid-DATA."""
    smtp_server.handler.mail_delay = 0.5
    smtp_server.handler.data_delay = JUST_UNDER
    task_id = enqueue(smtp_env, "b@example.com")
    result, elapsed = timed_drain(smtp_env)
    assert elapsed <= TIMEOUT + MARGIN, elapsed  # before: 0.5 + 1.3 s, delivered
    assert result == EmailSendResult(retried=1, waiting=1), result
    task = row(smtp_env, task_id)
    assert (task.status, task.attempts) == ("pending", 1)
    assert task.last_error is not None and "during DATA" in task.last_error
    assert TIMED_OUT in task.last_error
    # Retried, not handed back: a server may keep data it never acknowledged (aiosmtpd
    # drops it with the connection); the resend keeps the Message-ID.


def test_each_message_has_its_own_timeout_on_a_reused_connection(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    """Five messages on one connection, each well under 1.5 s, together over twice it."""
    # EHLO+MAIL+RCPT+DATA = 0.8 s, then MAIL+RCPT+DATA = 0.6 s each: 3.2 s in all. Each
    # message keeps 0.7 s of its timeout for a loaded machine (0.3 s was once too little).
    smtp_server.slow_steps(0.2)
    ids = [enqueue(smtp_env, f"c{n}@example.com") for n in range(5)]
    result, elapsed = timed_drain(smtp_env)
    assert result == EmailSendResult(sent=5), result
    assert elapsed > 2 * TIMEOUT, elapsed  # one timeout for the whole batch would have cut it
    assert {row(smtp_env, i).status for i in ids} == {"completed"}
    assert len(smtp_server.messages) == 5
