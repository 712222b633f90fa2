"""PendingUsersReminderJob's task: one transaction (enqueue + marks), retried on its own
for transient DB errors. A retry redoes the whole transaction, which rolled back."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs.db import get_engine, session_scope
from backjobs.jobs import pending_users_reminder
from backjobs.jobs.pending_users_reminder import PendingUsersReminderResult
from backjobs.settings import get_settings
from tasks._policy import DB_TASK_OPTIONS


@task(**DB_TASK_OPTIONS)
def remind_admins_of_pending_users(as_of: datetime) -> PendingUsersReminderResult:
    """Email every admin the users waiting for approval; mark the listed ones."""
    with session_scope(get_engine()) as session:
        return pending_users_reminder.remind_admins_of_pending_users(
            session, now=as_of, settings=get_settings()
        )
