"""EmailSendJob's loop: claim, send and record batch after batch (see
:mod:`backjobs.jobs.email_send` for what a run guarantees).

Double-buffered: the next batch is claimed while the workers send this one, so the
database round trips overlap with SMTP. Each claim is sized by the pace
(:mod:`backjobs.jobs.email_pace`) and committed before anything is sent; while a batch is
in flight every open lease of this run is renewed each ``lease / 3``; outcomes are
recorded in one transaction per batch on the rows the claim's token still holds. After a
stop (:meth:`Drain.wind_down`) the sends in progress are recorded and every other claimed
row is handed back.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from backjobs.db import session_scope
from backjobs.jobs import email_queue
from backjobs.jobs.email_outcome import Delivery, Halt, Outcome, Tally, deliver, to_acks
from backjobs.jobs.email_pace import Pace
from backjobs.jobs.email_queue import ClaimedTask
from backjobs.mail.transport import Transport
from backjobs.settings import Settings

logger = logging.getLogger(__name__)

MAX_RETRIED_PER_RUN = 10_000


@dataclass(frozen=True)
class _InFlight:
    token: str
    futures: list[Future[Outcome]]

    def unsent(self) -> int:
        return sum(not future.done() for future in self.futures)


@dataclass
class Drain:
    engine: Engine
    pool: ThreadPoolExecutor
    now: datetime
    wall: Callable[[], datetime]
    settings: Settings
    transport: Transport
    rng: random.Random
    halt: Halt
    pace: Pace
    tally: Tally = field(default_factory=Tally)
    # Claims not yet recorded, by owner token (None: the claim itself is under way).
    open: dict[str, _InFlight | None] = field(default_factory=dict)
    retried: set[int] = field(default_factory=set)  # never claimed again in this run

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.email_lease_seconds)

    def run(self) -> None:
        """Claim, send and record batch after batch until nothing is due or fits."""
        # Double-buffered: the next batch is claimed while the workers send this one, so
        # the database round trips overlap with SMTP instead of adding to it.
        in_flight: _InFlight | None = None
        while True:
            unsent = in_flight.unsent() if in_flight is not None else 0
            room = 0
            if self.halt.stopped() is None:
                room = self.pace.room(unsent=unsent, limit=self.settings.email_batch_size)
            if len(self.retried) > MAX_RETRIED_PER_RUN:
                room = 0  # a server refusing this much: leave the rest to the next run
            claimed = self.claim(room) if room > 0 else None
            if in_flight is not None:
                self.finish(in_flight)
            if claimed is None and (room > 0 or in_flight is None):
                return  # nothing due, or nothing fits with nothing in flight
            in_flight = claimed  # None: look again, now that the pace is known

    def claim(self, limit: int) -> _InFlight | None:
        """Claim up to ``limit`` rows (committed before anything is sent) and hand them
        to the workers."""
        token = uuid.uuid4().hex
        self.open[token] = None  # a stop from here on hands back whatever it claimed
        at = self.wall()
        with session_scope(self.engine) as session:
            batch = email_queue.claim_due(
                session,
                now=self.now,
                at=at,
                lease_until=at + self.lease,
                limit=limit,
                token=token,
                skip=self.retried,
            )
        if not batch:
            del self.open[token]
            return None
        in_flight = _InFlight(token, [self.pool.submit(self._send, task) for task in batch])
        self.open[token] = in_flight
        return in_flight

    def _send(self, task: ClaimedTask) -> Outcome:
        outcome = deliver(
            task, transport=self.transport, settings=self.settings, wall=self.wall, halt=self.halt
        )
        if outcome.delivery is not Delivery.UNTRIED:
            self.pace.count()
        return outcome

    def finish(self, in_flight: _InFlight) -> None:
        """Wait for the batch's sends, renewing every open lease meanwhile; record them."""
        every = max(0.05, self.settings.email_lease_seconds / 3)
        pending: set[Future[Outcome]] = set(in_flight.futures)
        while True:
            # Wakes once the whole batch is done, or every lease/3 to renew the leases.
            _, pending = wait(pending, timeout=every)
            if not pending:
                break
            with session_scope(self.engine) as session:
                email_queue.renew(
                    session, tokens=list(self.open), lease_until=self.wall() + self.lease
                )
        self._record(in_flight.token, [future.result() for future in in_flight.futures])

    def wind_down(self) -> None:
        """After a stop: the sends in progress end and are recorded; every other claimed
        row goes back to pending, its attempt handed back."""
        for in_flight in list(self.open.values()):
            if in_flight is not None:
                self.finish(in_flight)
        with session_scope(self.engine) as session:
            self.tally.released += email_queue.release_held(session, tokens=list(self.open))
        self.open.clear()
        logger.warning(
            "sending stopped: %d sent, %d emails handed back untried (no attempt used)",
            self.tally.sent,
            self.tally.released,
        )

    def _record(self, token: str, outcomes: list[Outcome]) -> None:
        at = self.wall()
        acks, tally = to_acks(outcomes, at=at, settings=self.settings, rng=self.rng)
        with session_scope(self.engine) as session:
            lost = email_queue.acknowledge(session, token=token, at=at, acks=acks)
        self.open.pop(token, None)
        if lost:
            logger.warning(
                "lost the lease of app tasks %s (taken over by another sender); "
                "their outcome here was not recorded",
                ", ".join(map(str, lost)),
            )
        tally.lost = len(lost)
        self.tally.add(tally)
        self.retried.update(retry.id for retry in acks.retries)
