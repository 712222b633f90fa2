"""PendingUsersReminderJob (``pending-users-reminder-job``): one email to every admin listing
the users who confirmed their email at least BACKJOBS_PENDING_USER_NOTIFICATION_DAYS ago
and still wait for approval (at most 100, "and N more waiting"); the listed users are
marked in the same transaction. No admin: nothing sent, nobody marked, counted
``skipped_no_admin``. See :mod:`backjobs.jobs.pending_users_reminder`.
"""

from __future__ import annotations

from datetime import datetime

from backjobs.jobs.pending_users_reminder import PendingUsersReminderResult
from backjobs.orchestration.jobbase import job_flow
from tasks.pending_users_reminder import remind_admins_of_pending_users


@job_flow("PendingUsersReminderJob")
def pending_users_reminder_job(as_of: datetime) -> PendingUsersReminderResult:
    """Remind the admins of the users waiting for approval."""
    return remind_admins_of_pending_users(as_of)
