"""One claimed email's fate: send it (:func:`deliver`), then what to write (:func:`to_acks`).

:func:`deliver` runs on a sender thread and never raises: it renders the row's payload,
hands the message to the transport and says what became of it (:class:`Delivery`). A
:class:`Halt` stops every later send of the run once the server failed, the run's time
budget is spent or the run is stopped (those rows come back ``UNTRIED``: no attempt
used). :func:`to_acks` turns a batch's outcomes into the acknowledgement
:func:`backjobs.jobs.email_queue.acknowledge` writes: sent, retried with backoff
(:func:`backoff_seconds`), failed, or released; and counts them (:class:`Tally`).
See :mod:`backjobs.jobs.email_send` for the rules.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

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
from backjobs.mail.render import OutgoingEmail, build_message, render_email
from backjobs.mail.transport import (
    RecipientsRefused,
    Refusal,
    SendError,
    ServerUnavailable,
    Transport,
)
from backjobs.settings import Settings

logger = logging.getLogger(__name__)


class Delivery(StrEnum):
    """What became of one claimed email."""

    SENT = "sent"  # everyone still owed has it, or was refused for good
    PARTIAL = "partial"  # some recipients got a 4xx: retry for them
    TRANSIENT = "transient"  # retry later, with backoff
    PERMANENT = "permanent"  # failed for good
    UNTRIED = "untried"  # never decided by the server: back to pending, attempt handed back


@dataclass(frozen=True)
class Outcome:
    task: ClaimedTask
    delivery: Delivery
    detail: str | None = None
    accepted: tuple[str, ...] = ()
    refusals: tuple[Refusal, ...] = ()


@dataclass
class Tally:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0

    def add(self, other: Tally) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.released += other.released
        self.lost += other.lost


@dataclass
class Halt:
    """Set once: no send starts after it. ``server_reason`` when the server caused it.

    It also sets itself at ``deadline`` (on ``monotonic``): the run's time budget.
    """

    reason: str | None = None
    server_reason: str | None = None
    deadline: float = math.inf
    monotonic: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, reason: str, *, server: bool = False) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                if server:
                    self.server_reason = reason

    def stopped(self) -> str | None:
        """Why no send may start now, else ``None``."""
        if self.reason is None and self.monotonic() >= self.deadline:
            self.set(BUDGET_SPENT)
        return self.reason


BUDGET_SPENT = "the run's time budget is spent"


def backoff_seconds(*, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before attempt ``attempt + 1``: ``base * 2**(attempt-1)`` capped, equal jitter."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return delay / 2 + rng.uniform(0, delay / 2)


def _message(
    task: ClaimedTask, *, settings: Settings, wall: Callable[[], datetime]
) -> OutgoingEmail | Outcome:
    """The row's message, rendered now; a permanent failure when its payload cannot be."""
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
        return Outcome(task, Delivery.PERMANENT, f"payload does not render: {exc}")
    return message


def deliver(
    task: ClaimedTask,
    *,
    transport: Transport,
    settings: Settings,
    wall: Callable[[], datetime],
    halt: Halt,
) -> Outcome:
    stopped = halt.stopped()
    if stopped is not None:
        return Outcome(task, Delivery.UNTRIED, stopped)
    if task.attempts > task.max_attempts:
        # Claimed that often without an answer: earlier senders died while sending it.
        return Outcome(
            task, Delivery.PERMANENT, "attempts exhausted (earlier sends never finished)"
        )
    message = _message(task, settings=settings, wall=wall)
    if isinstance(message, Outcome):
        return message
    if not message.to:  # everyone owed was dealt with earlier
        return Outcome(task, Delivery.SENT)
    try:
        refusals = transport.send(message)
    except ServerUnavailable as exc:
        halt.set(str(exc), server=True)
        return Outcome(task, Delivery.UNTRIED, str(exc))
    except RecipientsRefused as exc:
        delivery = Delivery.PERMANENT if exc.permanent else Delivery.PARTIAL
        return Outcome(task, delivery, str(exc), refusals=tuple(exc.refusals))
    except SendError as exc:
        delivery = Delivery.PERMANENT if exc.permanent else Delivery.TRANSIENT
        return Outcome(task, delivery, str(exc))
    except Exception as exc:  # a transport bug must not stop the batch; retry it later
        logger.exception("unexpected error sending app task %s", task.id)
        return Outcome(task, Delivery.TRANSIENT, f"{type(exc).__name__}: {exc}")
    refused = {r.address.lower() for r in refusals}
    accepted = tuple(a for a in message.to if a.lower() not in refused)
    retry = any(not r.permanent for r in refusals)
    delivery = Delivery.PARTIAL if retry else Delivery.SENT
    note = f"not delivered to: {'; '.join(map(str, refusals))}" if refusals else None
    return Outcome(task, delivery, note, accepted=accepted, refusals=tuple(refusals))


def to_acks(
    outcomes: list[Outcome], *, at: datetime, settings: Settings, rng: random.Random
) -> tuple[Acks, Tally]:
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
    tally = Tally(
        sent=len(sent), retried=len(retries), failed=len(failures), released=len(released)
    )
    return Acks(sent=sent, retries=retries, failures=failures, released=released), tally
