"""When a schedule on the Prefect server fires, computed by the code its scheduler runs, for
the stack's status, the orphan-run rule and the size of a job's silent window.

The times come from Prefect's own server-side ``CronSchedule``, not from croniter alone:
on the days a time zone's clocks change, croniter and Prefect's scheduler disagree (a
``30 2 * * *`` cron in Europe/Berlin, the day after clocks went back: croniter says 02:30
UTC, the scheduler makes the run at 01:30 UTC). The scheduler's times are the ones runs
carry, so they are the ones to compare with.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


def fire_times(schedule: Any, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` times a Prefect cron schedule (``cron``, ``timezone``,
    ``day_or``) fires after ``after``, in UTC, as the server's scheduler computes them.
    Raises what Prefect raises for a cron or time zone it cannot read."""
    from prefect.server.schemas.schedules import CronSchedule

    prefect_cron = CronSchedule(
        cron=schedule.cron,
        timezone=getattr(schedule, "timezone", None) or "UTC",
        day_or=getattr(schedule, "day_or", True),
    )
    # The scheduler's own generator (``get_dates`` is the same, as a coroutine): the times
    # on or after its start.
    dates = prefect_cron._get_dates_generator(n=count, start=after + timedelta(microseconds=1))
    return sorted(datetime.fromtimestamp(date.timestamp(), UTC) for date in dates)


def next_fire(schedule: Any, after: datetime) -> datetime | None:
    """When a Prefect cron schedule next fires after ``after``, in UTC, as the server's
    scheduler computes it; None for a schedule that is no cron, a cron that never fires
    (``deploy`` refuses those; a server may hold one), or one Prefect cannot read (an
    unknown time zone on this machine)."""
    if not getattr(schedule, "cron", None):
        return None
    try:
        times = fire_times(schedule, after, 1)
    except Exception:
        return None
    return times[0] if times else None


def fires_at(schedule: Any, when: datetime) -> bool:
    """Whether a schedule fires at ``when``, as the server's scheduler would have made a run
    for it. True when that cannot be told (a schedule that is no cron — interval, rrule —
    or a cron that cannot be computed here), so that a run is never refused on a guess."""
    if not getattr(schedule, "cron", None):
        return True
    fire = next_fire(schedule, when - timedelta(seconds=1))
    return fire is None or fire == when
