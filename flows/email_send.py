"""EmailSendJob (``email-send-job``): drain due ``email_send`` app tasks through SMTP or the
pickup folder, highest priority first, within ``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS``.

Claims are leased, so runs overlapping (ad hoc next to the schedule) never send a row
twice; failures are per row (retried with backoff or failed with the reason) and never
fail the run. The run fails only when the database or the task itself does.
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
