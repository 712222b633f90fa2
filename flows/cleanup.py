"""CleanupJob (``cleanup-job``): independent parts, failures aggregated.

The parts run concurrently and each retries on its own. A part that fails does not stop
the others; once all have ended, the run fails with a :class:`PartsFailed` naming each
failed part, while what the others deleted stays committed and is published.
"""

from __future__ import annotations

from datetime import datetime

from backjobs.jobs.cleanup import CleanupResult
from backjobs.orchestration.jobbase import gather_parts, job_flow
from tasks.cleanup import (
    delete_ended_outbox_rows,
    delete_expired_refresh_tokens,
    empty_trash_bin,
    remove_orphaned_files,
)


@job_flow("CleanupJob")
def cleanup_job(as_of: datetime) -> CleanupResult:
    """Delete expired tokens, empty the trash, remove abandoned uploads, prune the outbox."""
    parts = (
        delete_expired_refresh_tokens,
        empty_trash_bin,
        remove_orphaned_files,
        delete_ended_outbox_rows,
    )
    return gather_parts({part.name: part.submit(as_of) for part in parts}, empty=CleanupResult())
