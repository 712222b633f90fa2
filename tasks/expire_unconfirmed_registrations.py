"""ExpireUnconfirmedRegistrationsJob's tasks: the warning and the expiry phase, each retried
on its own for transient DB errors. Both commit batch by batch; a retry or a second run
redoes nothing committed (the "not yet" guards hold)."""

from __future__ import annotations

from datetime import datetime

from prefect import task

from backjobs.db import get_engine
from backjobs.jobs import expire_unconfirmed_registrations as expire
from backjobs.jobs.expire_unconfirmed_registrations import ExpireUnconfirmedRegistrationsResult
from backjobs.settings import get_settings
from tasks._policy import DB_TASK_OPTIONS


@task(**DB_TASK_OPTIONS)
def warn_expiring_registrations(as_of: datetime) -> ExpireUnconfirmedRegistrationsResult:
    """Send a fresh confirmation link to registrations expiring within the warning window."""
    return expire.warn_expiring_registrations(get_engine(), now=as_of, settings=get_settings())


@task(**DB_TASK_OPTIONS)
def decline_expired_registrations(as_of: datetime) -> ExpireUnconfirmedRegistrationsResult:
    """Decline expired unconfirmed registrations and queue their notices."""
    return expire.decline_expired_registrations(get_engine(), now=as_of, settings=get_settings())
