"""EmailSendJob's task: drain the outbox, retried on its own for transient DB errors.

A retry starts a fresh drain: rows the failed attempt had claimed stay leased until their
lease runs out, then they are sent again with the same Message-ID (at least once).
:class:`~backjobs.jobs.email_send.EmailServerUnavailable` (the SMTP server or its
configuration failed the run) is not a database error, so the policy does not retry it:
the run fails at once with the server's reply, and the next scheduled run tries again.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import task

from backjobs import outbox_admin
from backjobs.db import get_engine, session_scope
from backjobs.jobs import email_send
from backjobs.jobs.email_send import EmailSendResult
from backjobs.mail import make_transport
from backjobs.outbox_admin import OutboxStatus
from backjobs.settings import get_settings
from tasks._policy import DB_TASK_OPTIONS


@task(**DB_TASK_OPTIONS)
def send_due_emails(as_of: datetime) -> EmailSendResult:
    """Send the emails due at as_of, within the time budget."""
    settings = get_settings()
    transport = make_transport(settings)
    try:
        return email_send.send_due_emails(
            get_engine(), now=as_of, settings=settings, transport=transport
        )
    finally:
        transport.close()


@task(**DB_TASK_OPTIONS)
def outbox_status(as_of: datetime) -> OutboxStatus:
    """The outbox at as_of: pending, due now, waiting for a retry, failed in the last 24 h
    (leases and failures on the real clock)."""
    with session_scope(get_engine()) as session:
        return outbox_admin.outbox_status(session, now=as_of, at=datetime.now(UTC))
