"""The job clock's rules, shared by the job base, the CLI and the dashboard's gate: an
``as_of`` is aware UTC, and never more than a few minutes in the future unless
``BACKJOBS_ALLOW_FUTURE_AS_OF`` says this is a rehearsal. No Prefect here: the gate and the
command line check an ``as_of`` before any run exists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["FUTURE_AS_OF_TOLERANCE", "FutureAsOfRefused", "check_as_of", "to_utc"]

FUTURE_AS_OF_TOLERANCE = timedelta(minutes=5)


class FutureAsOfRefused(ValueError):
    """An ``as_of`` too far in the future, without ``BACKJOBS_ALLOW_FUTURE_AS_OF=true``."""


def to_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def check_as_of(as_of: datetime, *, now: datetime, allow_future: bool) -> None:
    """Refuse an ``as_of`` more than 5 minutes after ``now`` unless ``allow_future``."""
    ahead = as_of - now
    if ahead <= FUTURE_AS_OF_TOLERANCE or allow_future:
        return
    raise FutureAsOfRefused(
        f"as_of {as_of.isoformat()} is {_duration(ahead)} in the future: a job run on a "
        "future clock deletes what is still live (refresh tokens still valid, markers "
        "still in their retention). Use a past or present as_of, or set "
        "BACKJOBS_ALLOW_FUTURE_AS_OF=true where the job runs (rehearsals, test rigs only)"
    )


def _duration(delta: timedelta) -> str:
    if delta >= timedelta(days=2):
        return f"{delta.days} days"
    if delta >= timedelta(hours=2):
        return f"{delta // timedelta(hours=1)} hours"
    return f"{delta // timedelta(minutes=1)} minutes"
