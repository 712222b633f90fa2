"""EmailSendJob's logic: drain due ``email_send`` rows through a transport, batch by batch.

Each batch is claimed and committed *before* any mail goes out (so a crash leaves leased
``processing`` rows that a later run sends again, with the same Message-ID), sent over
``BACKJOBS_EMAIL_CONNECTIONS`` parallel connections, then acknowledged in one transaction
on the rows the claim's owner token still holds (rows lost to another sender are counted
``lost`` and logged, never overwritten):

- sent: ``completed``, ``completed_at`` = real time, ``last_error`` cleared;
- some recipients refused: those who accepted are recorded in the payload's
  ``delivered_to``; 4xx recipients are retried (same message, same Message-ID, only to
  them) with backoff; 5xx recipients are dropped, named in ``last_error`` and the
  payload's ``refused``. The row completes once nobody is left to retry;
- transient failure (4xx, a connection lost during DATA): back to ``pending``,
  ``next_attempt_at`` = real now + backoff (exponential, capped at
  ``BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS``, "equal" jitter), unless the row's
  ``max_attempts`` is used up, then ``failed``;
- permanent failure (5xx to the message, every recipient refused for good, a payload
  that is not JSON or no longer renders): ``failed`` with the reason, logged at error.
- When a row ends (sent or failed), ``completed_at`` records when (real time), and its
  template's secret fields are removed from the stored payload.

**The server's fault is not the message's.** When the transport raises
:class:`ServerUnavailable` (connection refused or timed out, EHLO/STARTTLS/TLS/AUTH
failure, MAIL FROM refused, any 421/530/535; see :mod:`backjobs.mail.smtp`), no
further send starts and no further batch is claimed; every claimed row not yet sent goes
back to ``pending`` with its attempt handed back, and the run raises
:class:`EmailServerUnavailable` with the server's reply (the run fails in the UI; the
task's retry policy does not retry it). Attempts count only when the server answered
about the message itself.

**Clocks.** ``now`` (the flow's ``as_of``) decides only what is due. Leases, their
lapse, backoff, ``completed_at`` and the ``Date:`` header use the real clock (``wall``,
read when used). **Leases are renewed** while a batch is in flight: the run renews every
live claim of its own each ``lease / 3`` seconds, so a slow server never lets a second
run take a row that is still being sent; a run that dies stops renewing and its rows are
claimed again one lease later. No new batch is claimed once
``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS`` (monotonic) is spent.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import ClassVar

from sqlalchemy import Engine

from backjobs.db import session_scope
from backjobs.jobs import email_queue
from backjobs.jobs.email_outcome import Halt, Outcome, Tally, deliver, to_acks
from backjobs.mail.transport import Transport
from backjobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmailSendResult:
    """What one EmailSendJob run did (flat counts: shown as the run's artifact)."""

    # Work left undone (the run ends "Completed with problems"): emails failed for good,
    # and sends whose outcome another sender overwrote (the lease was too short).
    PROBLEM_COUNTS: ClassVar[tuple[str, ...]] = ("failed", "lost")

    sent: int = 0
    retried: int = 0  # back to pending with backoff (some or all recipients)
    failed: int = 0
    released: int = 0  # claimed, then handed back untried: the server was unavailable
    lost: int = 0  # claimed, but another sender held the row when we acknowledged
    due_now: int = 0  # still due at as_of when the run ended
    waiting: int = 0  # pending, due later (a retry's backoff or a not_before)


class EmailServerUnavailable(RuntimeError):
    """The SMTP server (or its configuration) failed the run; ``partial_result`` is what
    the run did before it stopped."""

    def __init__(self, message: str, partial_result: EmailSendResult) -> None:
        super().__init__(message)
        self.partial_result = partial_result


def wall_clock() -> datetime:
    return datetime.now(UTC)


def send_due_emails(
    engine: Engine,
    *,
    now: datetime,
    settings: Settings,
    transport: Transport,
    rng: random.Random | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], datetime] = wall_clock,
) -> EmailSendResult:
    """Send every email due at ``now`` within the time budget; count what happened.

    Raises :class:`EmailServerUnavailable` when the server failed the run.
    """
    started = monotonic()
    tally = Tally()
    halt = Halt()
    with ThreadPoolExecutor(
        max_workers=settings.email_connections, thread_name_prefix="email-send"
    ) as pool:
        drain = _Drain(engine, pool, now, wall, settings, transport, rng or random.Random(), halt)
        in_flight: _InFlight | None = None
        claimed: _InFlight | None = None
        try:
            # Double-buffered: the next batch is claimed while the workers send this one,
            # so the database round trips overlap with SMTP instead of adding to it.
            while True:
                go_on = monotonic() - started < settings.email_time_budget_seconds
                claimed = drain.claim() if go_on and halt.reason is None else None
                if in_flight is not None:
                    tally.add(drain.finish(in_flight, also_renew=claimed))
                in_flight, claimed = claimed, None
                if in_flight is None:
                    break
        finally:
            halt.set("the run stopped")  # on error: start no send nobody will record
    with session_scope(engine) as session:
        queue = email_queue.count_queue(session, now=now, at=wall())
    result = EmailSendResult(
        sent=tally.sent,
        retried=tally.retried,
        failed=tally.failed,
        released=tally.released,
        lost=tally.lost,
        due_now=queue.due_now,
        waiting=queue.waiting,
    )
    if halt.server_reason is not None:
        logger.error("SMTP server unavailable, sending stopped: %s", halt.server_reason)
        raise EmailServerUnavailable(
            f"SMTP server unavailable: {halt.server_reason} "
            f"({result.released} emails handed back untried, no attempt used)",
            result,
        )
    return result


@dataclass(frozen=True)
class _InFlight:
    token: str
    futures: list[Future[Outcome]]


@dataclass(frozen=True)
class _Drain:
    engine: Engine
    pool: ThreadPoolExecutor
    now: datetime
    wall: Callable[[], datetime]
    settings: Settings
    transport: Transport
    rng: random.Random
    halt: Halt

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.email_lease_seconds)

    def claim(self) -> _InFlight | None:
        """Claim a batch (committed before anything is sent) and hand it to the workers."""
        token = uuid.uuid4().hex
        at = self.wall()
        with session_scope(self.engine) as session:
            batch = email_queue.claim_due(
                session,
                now=self.now,
                at=at,
                lease_until=at + self.lease,
                limit=self.settings.email_batch_size,
                token=token,
            )
        if not batch:
            return None
        send = partial(
            deliver,
            transport=self.transport,
            settings=self.settings,
            wall=self.wall,
            halt=self.halt,
        )
        return _InFlight(token, [self.pool.submit(send, task) for task in batch])

    def finish(self, in_flight: _InFlight, *, also_renew: _InFlight | None) -> Tally:
        """Wait for the batch's sends, renewing the leases meanwhile; record every outcome."""
        tokens = [b.token for b in (in_flight, also_renew) if b is not None]
        every = max(0.05, self.settings.email_lease_seconds / 3)
        pending: set[Future[Outcome]] = set(in_flight.futures)
        while True:
            # Wakes once the whole batch is done, or every lease/3 to renew the leases.
            _, pending = wait(pending, timeout=every)
            if not pending:
                break
            with session_scope(self.engine) as session:
                email_queue.renew(session, tokens=tokens, lease_until=self.wall() + self.lease)
        return self._record(in_flight.token, [future.result() for future in in_flight.futures])

    def _record(self, token: str, outcomes: list[Outcome]) -> Tally:
        at = self.wall()
        acks, tally = to_acks(outcomes, at=at, settings=self.settings, rng=self.rng)
        with session_scope(self.engine) as session:
            lost = email_queue.acknowledge(session, token=token, at=at, acks=acks)
        if lost:
            logger.warning(
                "lost the lease of app tasks %s (taken over by another sender); "
                "their outcome here was not recorded",
                ", ".join(map(str, lost)),
            )
        tally.lost = len(lost)
        return tally
