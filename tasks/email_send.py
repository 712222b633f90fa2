"""EmailSendJob's task: drain the outbox, retried on its own for transient DB errors.

A retry starts a fresh drain: rows the failed attempt had claimed stay leased until their
lease runs out, then they are sent again with the same Message-ID (at least once).
"""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs.db import get_engine
from backjobs.email_send import send_due_emails
from backjobs.settings import get_settings
from backjobs.transport import make_transport
from tasks._policy import DB_TASK_OPTIONS


@task(name="send-due-emails", **DB_TASK_OPTIONS)
def send_due_emails_task(as_of: datetime) -> dict[str, int]:
    """Send the emails due at as_of, within the time budget; return the counts."""
    settings = get_settings()
    transport = make_transport(settings)
    try:
        result = send_due_emails(get_engine(), now=as_of, settings=settings, transport=transport)
    finally:
        transport.close()
    return {
        "sent": result.sent,
        "retried": result.retried,
        "failed": result.failed,
        "left": result.left,
    }
