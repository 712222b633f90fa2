"""When a schedule on the Prefect server fires, computed as its scheduler does (the croniter
Prefect vendors), for the stack's status and the orphan-run rule."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo


def next_fire(schedule: Any, after: datetime) -> datetime | None:
    """When a Prefect cron schedule (``cron``, ``timezone``, ``day_or``) next fires after
    ``after``, in UTC, as the server's scheduler computes it; None for a schedule that is
    no cron or a cron that never fires (``deploy`` refuses those; a server may hold one)."""
    from prefect._vendor.croniter import croniter  # type: ignore[attr-defined]

    cron = getattr(schedule, "cron", None)
    if not cron:
        return None
    zone = ZoneInfo(getattr(schedule, "timezone", None) or "UTC")
    try:
        it = croniter(cron, after.astimezone(zone), day_or=getattr(schedule, "day_or", True))  # type: ignore[no-untyped-call]
        fire: datetime = it.get_next(datetime)  # type: ignore[no-untyped-call]
    except Exception:
        return None
    return fire.astimezone(UTC)
