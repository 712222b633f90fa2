"""EmailSendJob (``email-send-job``): drain due ``email_send`` app tasks through SMTP or the
pickup folder, highest priority first, within ``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS``.

Claims are leased on the real clock and renewed while sending, so runs overlapping (ad
hoc next to the schedule, or a late one) never send a row twice; a message's failures are
per row (retried with backoff or failed with the reason) and never fail the run. The run
fails when the database does, or when the SMTP server does (unreachable, TLS, AUTH, a
refused sender, 421/530/535): then its message carries the server's reply, the rows wait
without using an attempt, and the result artifact shows what was sent before.
"""

from __future__ import annotations

from datetime import datetime

from backjobs.jobs.email_send import EmailSendResult
from backjobs.orchestration.jobbase import job_flow
from tasks.email_send import send_due_emails


@job_flow("EmailSendJob")
def email_send_job(as_of: datetime) -> EmailSendResult:
    """Send the due emails of the outbox (priority, then age), retrying transient failures."""
    return send_due_emails(as_of)
