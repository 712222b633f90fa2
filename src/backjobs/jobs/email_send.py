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
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial

from sqlalchemy import Engine

from backjobs.db import session_scope
from backjobs.jobs import email_queue
from backjobs.jobs.email_payload import (
    bookkept,
    dropped_note,
    read_payload,
    scrubbed,
    scrubbed_or_none,
    secret_fields_in,
    still_owed,
    stored_message_id,
)
from backjobs.jobs.email_queue import Acks, ClaimedTask, Failure, Retry, Sent
from backjobs.mail.render import build_message, render_email
from backjobs.mail.transport import (
    RecipientsRefused,
    Refusal,
    SendError,
    ServerUnavailable,
    Transport,
)
from backjobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmailSendResult:
    """What one EmailSendJob run did (flat counts: shown as the run's artifact)."""

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


class Delivery(StrEnum):
    """What became of one claimed email."""

    SENT = "sent"  # everyone still owed has it, or was refused for good
    PARTIAL = "partial"  # some recipients got a 4xx: retry for them
    TRANSIENT = "transient"  # retry later, with backoff
    PERMANENT = "permanent"  # failed for good
    UNTRIED = "untried"  # never decided by the server: back to pending, attempt handed back


@dataclass(frozen=True)
class _Outcome:
    task: ClaimedTask
    delivery: Delivery
    detail: str | None = None
    accepted: tuple[str, ...] = ()
    refusals: tuple[Refusal, ...] = ()


@dataclass
class _Tally:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0

    def add(self, other: _Tally) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.released += other.released
        self.lost += other.lost


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
    tally = _Tally()
    halt = _Halt()
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


@dataclass
class _Halt:
    """Set once: no send starts after it. ``server_reason`` when the server caused it."""

    reason: str | None = None
    server_reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, reason: str, *, server: bool = False) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                if server:
                    self.server_reason = reason


@dataclass(frozen=True)
class _InFlight:
    token: str
    futures: list[Future[_Outcome]]


@dataclass(frozen=True)
class _Drain:
    engine: Engine
    pool: ThreadPoolExecutor
    now: datetime
    wall: Callable[[], datetime]
    settings: Settings
    transport: Transport
    rng: random.Random
    halt: _Halt

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
            _deliver,
            transport=self.transport,
            settings=self.settings,
            wall=self.wall,
            halt=self.halt,
        )
        return _InFlight(token, [self.pool.submit(send, task) for task in batch])

    def finish(self, in_flight: _InFlight, *, also_renew: _InFlight | None) -> _Tally:
        """Wait for the batch's sends, renewing the leases meanwhile; record every outcome."""
        tokens = [b.token for b in (in_flight, also_renew) if b is not None]
        every = max(0.05, self.settings.email_lease_seconds / 3)
        pending: set[Future[_Outcome]] = set(in_flight.futures)
        while True:
            # Wakes once the whole batch is done, or every lease/3 to renew the leases.
            _, pending = wait(pending, timeout=every)
            if not pending:
                break
            with session_scope(self.engine) as session:
                email_queue.renew(session, tokens=tokens, lease_until=self.wall() + self.lease)
        return self._record(in_flight.token, [future.result() for future in in_flight.futures])

    def _record(self, token: str, outcomes: list[_Outcome]) -> _Tally:
        at = self.wall()
        acks, tally = _acks(outcomes, at=at, settings=self.settings, rng=self.rng)
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


def backoff_seconds(*, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)`` capped, equal jitter."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return delay / 2 + rng.uniform(0, delay / 2)


def _deliver(
    task: ClaimedTask,
    *,
    transport: Transport,
    settings: Settings,
    wall: Callable[[], datetime],
    halt: _Halt,
) -> _Outcome:
    if halt.reason is not None:
        return _Outcome(task, Delivery.UNTRIED, halt.reason)
    if task.attempts > task.max_attempts:
        # Claimed that often without an answer: earlier senders died while sending it.
        return _Outcome(
            task, Delivery.PERMANENT, "attempts exhausted (earlier sends never finished)"
        )
    try:
        to, template, context = read_payload(task.payload)
        rendered = render_email(template, context)
        message = build_message(
            rendered,
            task_id=task.id,
            to=to,
            sender=settings.email_from,
            date=wall(),  # the real time of sending, whatever the job's as_of
            message_id=stored_message_id(task.payload),
            envelope_to=still_owed(task.payload, to),
        )
    except (ValueError, TypeError) as exc:
        return _Outcome(task, Delivery.PERMANENT, f"payload does not render: {exc}")
    if not message.to:  # everyone owed was dealt with earlier
        return _Outcome(task, Delivery.SENT)
    try:
        refusals = transport.send(message)
    except ServerUnavailable as exc:
        halt.set(str(exc), server=True)
        return _Outcome(task, Delivery.UNTRIED, str(exc))
    except RecipientsRefused as exc:
        delivery = Delivery.PERMANENT if exc.permanent else Delivery.PARTIAL
        return _Outcome(task, delivery, str(exc), refusals=tuple(exc.refusals))
    except SendError as exc:
        delivery = Delivery.PERMANENT if exc.permanent else Delivery.TRANSIENT
        return _Outcome(task, delivery, str(exc))
    except Exception as exc:  # a transport bug must not stop the batch; retry it later
        logger.exception("unexpected error sending app task %s", task.id)
        return _Outcome(task, Delivery.TRANSIENT, f"{type(exc).__name__}: {exc}")
    refused = {r.address.lower() for r in refusals}
    accepted = tuple(a for a in message.to if a.lower() not in refused)
    retry = any(not r.permanent for r in refusals)
    delivery = Delivery.PARTIAL if retry else Delivery.SENT
    note = f"not delivered to: {'; '.join(map(str, refusals))}" if refusals else None
    return _Outcome(task, delivery, note, accepted=accepted, refusals=tuple(refusals))


def _acks(
    outcomes: list[_Outcome], *, at: datetime, settings: Settings, rng: random.Random
) -> tuple[Acks, _Tally]:
    sent: list[Sent] = []
    retries: list[Retry] = []
    failures: list[Failure] = []
    released: list[int] = []
    for o in outcomes:
        task = o.task
        # Who has it now (a new payload only when a recipient was refused, now or before).
        payload = bookkept(task.payload, accepted=o.accepted, refusals=o.refusals)
        news = payload is not task.payload
        if o.delivery is Delivery.UNTRIED:
            released.append(task.id)
        elif o.delivery is Delivery.SENT:
            ended = scrubbed(payload) if news or secret_fields_in(payload) else None
            sent.append(Sent(task.id, dropped_note(payload, o.detail), ended))
        elif o.delivery is Delivery.PERMANENT:
            failures.append(Failure(task.id, o.detail or "", scrubbed_or_none(task.payload)))
        elif task.attempts >= task.max_attempts:  # PARTIAL or TRANSIENT, nothing left
            error = f"attempts exhausted ({task.attempts}): {o.detail or ''}"
            failures.append(Failure(task.id, error, scrubbed(payload)))
        else:
            delay = backoff_seconds(
                attempt=task.attempts,
                base=settings.email_backoff_base_seconds,
                cap=settings.email_backoff_max_seconds,
                rng=rng,
            )
            due = at + timedelta(seconds=delay)
            retries.append(Retry(task.id, o.detail or "", due, payload if news else None))
    for failure in failures:
        logger.error("app task %s failed: %s", failure.id, failure.error)
    tally = _Tally(
        sent=len(sent), retried=len(retries), failed=len(failures), released=len(released)
    )
    return Acks(sent=sent, retries=retries, failures=failures, released=released), tally
