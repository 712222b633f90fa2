"""The Prefect server's causal ordering of events for triggers, without the 15-minute hold.

Set on the server: ``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=backjobs.orchestration.causal_ordering``
(``backjobs dashboard`` sets it by default; a server started another way must set it).

Why: a flow-run state event carries ``follows`` = the previous state's id when that state
is under 5 minutes old. The scheduler inserts Scheduled runs straight into the database
and emits no Scheduled event, so a scheduled run that goes Pending within 5 minutes of
being created (every run scheduled close to a deploy) has a leader that never arrives.
Prefect's in-memory ordering parks such an event, and every event that follows it, for
``PRECEDING_EVENT_LOOKBACK`` (15 minutes), and loses them when the server restarts: a
Failed-run automation fired for 4 of 10 failures, and zombie (heartbeat) triggers fired for
runs already ended. No trigger definition avoids it, the hold comes before any trigger.

This ordering keeps Prefect's bookkeeping (an event is processed once; an event whose
leader is being processed right now waits for it, up to a few seconds) but never parks an
event for a leader it has not seen: that leader may never come. What it gives up is the
order of two events delivered out of order by the bus, which the automations of backjobs
do not depend on (each reacts to one state; the zombie check re-reads the run's state
before it acts).
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from prefect.server.events.ordering import memory
from prefect.server.events.schemas.events import ReceivedEvent

MODULE = __name__


class CausalOrdering(memory.CausalOrdering):
    # Own registries: the parent keeps one instance per scope in class attributes.
    _instances: dict[str, Any] = {}  # noqa: RUF012 - as the parent declares them
    _locks: dict[str, asyncio.Lock] = {}  # noqa: RUF012

    async def wait_for_leader(self, event: ReceivedEvent) -> None:
        if not event.follows or event.follows == event.id:
            return
        if await self.event_has_been_seen(event.follows):
            return
        if await self.event_has_started_processing(event.follows):
            with anyio.move_on_after(memory.IN_FLIGHT_EVENT_TIMEOUT.total_seconds()):
                while not await self.event_has_been_seen(event.follows):
                    await asyncio.sleep(0.25)
        # Not seen: go on now rather than wait for a leader that may never be emitted.
