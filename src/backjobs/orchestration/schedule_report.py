"""What ``backjobs deploy`` prints: every change of a deployment's schedules on the server.

The schedules of every deployment are read before the whole deploy and after it
(:func:`read_schedules`), and :func:`describe_changes` makes each difference one line —
a cron from → to, a schedule added or removed, paused or re-activated — whoever made it
(``prefect deploy`` applies a changed cron itself; the sync step reverts a pause made in
the UI and says so, with the line to add to keep it). A deployment with no difference
gets one "unchanged" line listing its schedules.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class ServerSchedule(NamedTuple):
    """One schedule as the server holds it."""

    id: str
    cron: str
    timezone: str
    active: bool
    slug: str | None


async def read_schedules(client: Any, names: list[str]) -> dict[str, list[ServerSchedule] | None]:
    """Each deployment's schedules on the server; None for one not deployed yet."""
    from prefect.exceptions import ObjectNotFound

    found: dict[str, list[ServerSchedule] | None] = {}
    for name in names:
        try:
            deployment = await client.read_deployment_by_name(f"{name}/{name}")
        except ObjectNotFound:
            found[name] = None
            continue
        found[name] = await server_schedules(client, deployment.id)
    return found


async def server_schedules(client: Any, deployment_id: Any) -> list[ServerSchedule]:
    """The schedules of one deployment as the server holds them."""
    return [
        ServerSchedule(
            id=str(s.id),
            cron=str(getattr(s.schedule, "cron", s.schedule)),
            timezone=getattr(s.schedule, "timezone", None) or "UTC",
            active=bool(s.active),
            slug=s.slug or None,
        )
        for s in await client.read_deployment_schedules(deployment_id)
    ]


KEEP_PAUSED = "add `active: false` to keep it paused"


def describe_changes(
    name: str, before: list[ServerSchedule] | None, after: list[ServerSchedule]
) -> list[str]:
    """One line per difference between a deployment's schedules before and after a deploy
    (matched by id, else slug, else cron and timezone); one line saying so when none."""
    if before is None:
        listed = ", ".join(_shown(s) for s in after) or "no schedule"
        return [f"{name}: deployed for the first time: {listed}"]
    lines = []
    left = list(before)
    for now in after:
        was = _counterpart(left, now)
        if was is None:
            lines.append(f"{name}: {_label(now)} `{now.cron}` added ({_activity(now)})")
            continue
        left.remove(was)
        if (was.cron, was.timezone) != (now.cron, now.timezone):
            zone = f" ({was.timezone} → {now.timezone})" if was.timezone != now.timezone else ""
            lines.append(f"{name}: {_label(now)}: cron `{was.cron}` → `{now.cron}`{zone}")
        if was.active and not now.active:
            lines.append(
                f"{name}: {_label(now)} `{now.cron}` paused (prefect.yaml says `active: false`)"
            )
        elif now.active and not was.active:
            lines.append(
                f"{name}: {_label(now)} `{now.cron}` re-activated (paused on the server; "
                f"prefect.yaml says active — {KEEP_PAUSED})"
            )
    for gone in left:
        lines.append(f"{name}: {_label(gone)} `{gone.cron}` removed (not in prefect.yaml)")
    if not lines:
        listed = ", ".join(_shown(s) for s in after) or "no schedule"
        lines.append(f"{name}: unchanged: {listed}")
    return lines


def describe_retired(name: str, full_name: str, before: list[ServerSchedule]) -> list[str]:
    """The lines of a backjobs deployment prefect.yaml no longer lists (``full_name``:
    ``flow/deployment``): each schedule the deploy removed, then what is left of it."""
    lines = [
        f"{name}: {_label(gone)} `{gone.cron}` removed (the job is not in prefect.yaml)"
        for gone in before
    ]
    lines.append(
        f"{name}: not in prefect.yaml: never runs on its own; the deployment stays on the "
        f"server with its past runs, a run started by hand still alerted (`prefect "
        f"deployment delete {full_name}` deletes it, and the next deploy its automations)"
    )
    return lines


def _counterpart(candidates: list[ServerSchedule], schedule: ServerSchedule) -> Any:
    for same in (
        lambda c: c.id == schedule.id,
        lambda c: schedule.slug is not None and c.slug == schedule.slug,
        lambda c: (c.cron, c.timezone, c.slug) == (schedule.cron, schedule.timezone, schedule.slug),
    ):
        for candidate in candidates:
            if same(candidate):
                return candidate
    return None


def _label(schedule: ServerSchedule) -> str:
    return f"schedule {schedule.slug}" if schedule.slug else "schedule"


def _activity(schedule: ServerSchedule) -> str:
    return "active" if schedule.active else "paused"


def _shown(schedule: ServerSchedule) -> str:
    zone = "" if schedule.timezone == "UTC" else f" {schedule.timezone}"
    return f"`{schedule.cron}`{zone} {_activity(schedule)}"
