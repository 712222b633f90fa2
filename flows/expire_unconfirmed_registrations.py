"""ExpireUnconfirmedRegistrationsJob (``expire-unconfirmed-registrations-job``): two
independent parts over disjoint users — registrations nearing expiry get a fresh
confirmation link, expired ones are declined with a notice. A failing part does not stop
the other; the run then fails naming it. See
:mod:`backjobs.jobs.expire_unconfirmed_registrations`.
"""

from __future__ import annotations

from datetime import datetime

from backjobs.jobs.expire_unconfirmed_registrations import ExpireUnconfirmedRegistrationsResult
from backjobs.orchestration.jobbase import gather_parts, job_flow
from tasks.expire_unconfirmed_registrations import (
    decline_expired_registrations,
    warn_expiring_registrations,
)


@job_flow("ExpireUnconfirmedRegistrationsJob")
def expire_unconfirmed_registrations_job(as_of: datetime) -> ExpireUnconfirmedRegistrationsResult:
    """Warn registrations nearing expiry; decline expired ones."""
    parts = (warn_expiring_registrations, decline_expired_registrations)
    return gather_parts(
        {part.name: part.submit(as_of) for part in parts},
        empty=ExpireUnconfirmedRegistrationsResult(),
    )
