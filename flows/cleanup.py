"""CleanupJob (``cleanup-job``): three independent parts, failures aggregated.

The parts run concurrently and each retries on its own. A part that fails does not stop
the others; once all have ended, the run fails with an ``ExceptionGroup`` naming each
failed part, while what the others deleted stays committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from prefect.futures import wait

from backjobs.jobbase import job_flow, publish_result
from tasks.cleanup import delete_expired_sessions, empty_trash_bin, remove_orphaned_files


@dataclass(frozen=True)
class CleanupResult:
    refresh_tokens_deleted: int | None
    markers_deleted: int | None
    orphaned_files_removed: int | None
    orphaned_files_bad_keys: int | None
    failed_parts: tuple[str, ...] = ()


def _cleanup(as_of: datetime) -> CleanupResult:
    """Delete expired refresh tokens, empty the markers trash, remove abandoned uploads."""
    parts = {
        "expired-sessions": delete_expired_sessions.submit(as_of),
        "trash-bin": empty_trash_bin.submit(as_of),
        "orphaned-files": remove_orphaned_files.submit(as_of),
    }
    wait(list(parts.values()))
    values = {}
    errors: dict[str, Exception] = {}
    for name, future in parts.items():
        outcome = future.result(raise_on_failure=False)
        if future.state.is_completed():
            values[name] = outcome
        else:
            errors[name] = _as_exception(name, outcome)
    files = values.get("orphaned-files") or {}
    result = CleanupResult(
        refresh_tokens_deleted=values.get("expired-sessions"),
        markers_deleted=values.get("trash-bin"),
        orphaned_files_removed=files.get("removed"),
        orphaned_files_bad_keys=files.get("bad_keys"),
        failed_parts=tuple(errors),
    )
    if errors:
        publish_result("CleanupJob", result)
        raise ExceptionGroup(
            f"CleanupJob: {len(errors)} of {len(parts)} parts failed: {', '.join(errors)}",
            list(errors.values()),
        )
    return result


def _as_exception(part: str, outcome: object) -> Exception:
    if isinstance(outcome, Exception):
        return outcome
    return RuntimeError(f"{part}: ended without a result ({outcome!r})")


cleanup_job = job_flow("CleanupJob")(_cleanup)
