"""EmailSendJob's logic: drain due ``email_send`` rows through a transport, batch by batch.

Each batch is claimed and committed *before* any mail goes out (so a crash leaves leased
``processing`` rows that the next run sends again, with the same Message-ID), sent over
``BACKJOBS_EMAIL_CONNECTIONS`` parallel connections, then acknowledged in one transaction:

- sent: ``completed``, ``completed_at`` set, sensitive context (a confirmation link)
  cleared from the payload; a partial refusal is noted in ``last_error``;
- transient failure: back to ``pending``, ``next_attempt_at`` = now + backoff (exponential,
  capped at ``BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS``, "equal" jitter: half fixed, half
  random), unless the row's ``max_attempts`` is used up, then ``failed``;
- permanent failure (5xx, every recipient refused, a payload or template that no longer
  renders): ``failed`` with the reason. One bad row never stops the batch.

When the SMTP server cannot be reached, no further batch is claimed; the rows the
transport did not even try go back to ``pending`` untouched (their attempt handed back).

The clock: the flow reads ``as_of`` once and passes it as ``now``. A drain may last up to
``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS``, so leases, backoffs and the due check of each batch
use ``now`` + the monotonic time elapsed since the drain began: a late batch's lease then
starts when the batch is claimed, not when the run began, and no wall clock is read.
No new batch is claimed once the budget is spent.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from backjobs import outbox
from backjobs.db import session_scope
from backjobs.mail.render import build_message, check_recipients, render_email, sensitive_fields
from backjobs.mail.transport import SendError, ServerUnavailable, Transport
from backjobs.outbox import ClaimedTask, Failure, Retry
from backjobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmailSendResult:
    """What one EmailSendJob run did."""

    sent: int
    retried: int
    failed: int
    left: int


class Delivery(StrEnum):
    """What became of one claimed email."""

    SENT = "sent"
    TRANSIENT = "transient"  # retry later, with backoff
    PERMANENT = "permanent"  # failed for good
    UNTRIED = "untried"  # never handed to the server: back to pending, attempt handed back


@dataclass(frozen=True)
class _Outcome:
    task: ClaimedTask
    delivery: Delivery
    detail: str | None = None
    server_down: bool = False


@dataclass
class _Tally:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    server_down: bool = False

    def add(self, other: _Tally) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.server_down = self.server_down or other.server_down


def send_due_emails(
    engine: Engine,
    *,
    now: datetime,
    settings: Settings,
    transport: Transport,
    rng: random.Random | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> EmailSendResult:
    """Send every due email (as of ``now``) within the time budget; count what happened."""
    rng = rng or random.Random()
    started = monotonic()

    def clock() -> datetime:
        return now + timedelta(seconds=monotonic() - started)

    tally = _Tally()
    workers = settings.email_connections
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="email-send") as pool:
        drain = _Drain(engine, pool, clock, settings, transport, rng)
        in_flight: _InFlight | None = None
        claimed: _InFlight | None = None
        try:
            # Double-buffered: the next batch is claimed while the workers send this one,
            # so the database round trips overlap with SMTP instead of adding to it.
            while True:
                go_on = monotonic() - started < settings.email_time_budget_seconds
                claimed = drain.claim() if go_on and not tally.server_down else None
                if in_flight is not None:
                    tally.add(drain.finish(in_flight))
                in_flight, claimed = claimed, None
                if in_flight is None:
                    break
        finally:
            for batch in (in_flight, claimed):  # on error: start no send nobody will record
                if batch is not None:
                    for future in batch.futures:
                        future.cancel()
    with session_scope(engine) as session:
        left = outbox.count_due(session, now=clock())
    return EmailSendResult(sent=tally.sent, retried=tally.retried, failed=tally.failed, left=left)


@dataclass(frozen=True)
class _InFlight:
    lease_until: datetime
    futures: list[Future[_Outcome]]


@dataclass(frozen=True)
class _Drain:
    engine: Engine
    pool: ThreadPoolExecutor
    clock: Callable[[], datetime]
    settings: Settings
    transport: Transport
    rng: random.Random

    def claim(self) -> _InFlight | None:
        """Claim a batch (committed before anything is sent) and hand it to the workers."""
        at = self.clock()
        lease_until = at + timedelta(seconds=self.settings.email_lease_seconds)
        with session_scope(self.engine) as session:
            batch = outbox.claim_due(
                session, now=at, lease_until=lease_until, limit=self.settings.email_batch_size
            )
        if not batch:
            return None
        send = partial(_deliver, transport=self.transport, settings=self.settings, at=at)
        return _InFlight(lease_until, [self.pool.submit(send, task) for task in batch])

    def finish(self, in_flight: _InFlight) -> _Tally:
        """Wait for the batch's sends and record every outcome in one transaction."""
        outcomes = [future.result() for future in in_flight.futures]
        with session_scope(self.engine) as session:
            return _record(
                session,
                outcomes,
                now=self.clock(),
                lease_until=in_flight.lease_until,
                settings=self.settings,
                rng=self.rng,
            )


def backoff_seconds(*, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)`` capped, equal jitter."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return delay / 2 + rng.uniform(0, delay / 2)


def read_payload(payload: Any) -> tuple[list[str], str, dict[str, Any]]:
    """(recipients, template, context) from a stored payload; ``ValueError`` if malformed."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload is {type(payload).__name__}, not an object")
    template, context = payload.get("template"), payload.get("context")
    if not isinstance(template, str) or not isinstance(context, Mapping):
        raise ValueError("payload needs a 'template' string and a 'context' object")
    to = payload.get("to")
    if not isinstance(to, str | list) or not all(isinstance(a, str) for a in to):
        raise ValueError("payload 'to' must be an address or a list of addresses")
    return check_recipients(to), template, dict(context)


def _deliver(
    task: ClaimedTask, *, transport: Transport, settings: Settings, at: datetime
) -> _Outcome:
    if task.attempts > task.max_attempts:
        # Claimed that often without an answer: earlier senders died while sending it.
        return _Outcome(
            task, Delivery.PERMANENT, "attempts exhausted (earlier sends never finished)"
        )
    try:
        to, template, context = read_payload(task.payload)
        rendered = render_email(template, context)
        message = build_message(
            rendered, task_id=task.id, to=to, sender=settings.email_from, date=at
        )
    except (ValueError, TypeError) as exc:
        return _Outcome(task, Delivery.PERMANENT, f"payload does not render: {exc}")
    try:
        refused = transport.send(message)
    except ServerUnavailable as exc:
        delivery = Delivery.TRANSIENT if exc.attempted else Delivery.UNTRIED
        return _Outcome(task, delivery, str(exc), server_down=True)
    except SendError as exc:
        delivery = Delivery.PERMANENT if exc.permanent else Delivery.TRANSIENT
        return _Outcome(task, delivery, str(exc))
    except Exception as exc:  # a transport bug must not stop the batch; retry it later
        logger.exception("unexpected error sending app task %s", task.id)
        return _Outcome(task, Delivery.TRANSIENT, f"{type(exc).__name__}: {exc}")
    note = f"not delivered to: {'; '.join(refused)}" if refused else None
    return _Outcome(task, Delivery.SENT, note)


def _record(
    session: Session,
    outcomes: list[_Outcome],
    *,
    now: datetime,
    lease_until: datetime,
    settings: Settings,
    rng: random.Random,
) -> _Tally:
    sent = [o for o in outcomes if o.delivery is Delivery.SENT]
    retries: list[Retry] = []
    failures = [
        Failure(o.task.id, o.detail or "") for o in outcomes if o.delivery is Delivery.PERMANENT
    ]
    for outcome in (o for o in outcomes if o.delivery is Delivery.TRANSIENT):
        task, error = outcome.task, outcome.detail or ""
        if task.attempts >= task.max_attempts:
            failures.append(Failure(task.id, f"attempts exhausted ({task.attempts}): {error}"))
            continue
        delay = backoff_seconds(
            attempt=task.attempts,
            base=settings.email_backoff_base_seconds,
            cap=settings.email_backoff_max_seconds,
            rng=rng,
        )
        retries.append(Retry(task.id, error, now + timedelta(seconds=delay)))
    for failure in failures:
        logger.warning("app task %s failed: %s", failure.id, failure.error)
    outbox.mark_sent(
        session,
        ids=[o.task.id for o in sent],
        lease_until=lease_until,
        now=now,
        details={o.task.id: (_scrubbed(o.task.payload), o.detail) for o in sent if _touch(o)},
    )
    outbox.mark_retry(session, retries=retries, lease_until=lease_until)
    outbox.mark_failed(session, failures=failures, lease_until=lease_until)
    untried = [o.task.id for o in outcomes if o.delivery is Delivery.UNTRIED]
    outbox.release(session, ids=untried, lease_until=lease_until)
    down = any(o.server_down for o in outcomes)
    return _Tally(sent=len(sent), retried=len(retries), failed=len(failures), server_down=down)


def _touch(outcome: _Outcome) -> bool:
    # Rows needing their own UPDATE: a note to keep or a secret to clear.
    return outcome.detail is not None or bool(_secret_fields_in(outcome.task.payload))


def _secret_fields_in(payload: Any) -> frozenset[str]:
    return sensitive_fields(payload.get("template", "")) & set(payload.get("context", {}))


def _scrubbed(payload: Any) -> Any:
    secrets = _secret_fields_in(payload)
    if not secrets:
        return payload
    context = {key: None if key in secrets else value for key, value in payload["context"].items()}
    return {**payload, "context": context}
