"""EmailSendJob's logic: drain due ``email_send`` rows through a transport, batch by batch
(the loop: :mod:`backjobs.jobs.email_drain`; a row's outcome: :mod:`.email_outcome`).

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
failure, MAIL FROM refused, any 421/530/535, see :mod:`backjobs.mail.smtp`; a pickup
folder that cannot be written, see :mod:`backjobs.mail.transport`), no
further send starts and no further batch is claimed; every claimed row not yet sent goes
back to ``pending`` with its attempt handed back, and the run raises
:class:`EmailServerUnavailable` with the server's reply or the folder's error, starting
"email transport unavailable: " (the run fails in the UI; the
task's retry policy does not retry it). Attempts count only when the server answered
about the message itself.

**Clocks.** ``now`` (the flow's ``as_of``) decides only what is due. Leases, their
lapse, backoff, ``completed_at`` and the ``Date:`` header use the real clock (``wall``,
read when used). **Leases are renewed** while a batch is in flight: the run renews every
live claim of its own each ``lease / 3`` seconds, so a slow server never lets a second
run take a row that is still being sent; a run that dies stops renewing and its rows are
claimed again one lease later.

**The time budget bounds the run** (``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS``, monotonic from
the run's start). Each claim takes only what the run can send in the budget left, judged
from its pace so far (:mod:`backjobs.jobs.email_pace`). Once the budget is spent no send
starts: the claimed rows not tried go back to ``pending``, due as before, with their
attempt handed back (counted ``released``). A send in progress at that moment ends first,
so a run sends for at most the budget plus ``BACKJOBS_SMTP_TIMEOUT_SECONDS``: that timeout
bounds a message's whole SMTP exchange, not each reply (:mod:`backjobs.mail.smtp`).

**A stopped run hands back its claims.** When the run is cancelled (Prefect raises
``TerminationSignal``, a ``BaseException``, in the flow's thread), no further send starts,
the sends in progress end and are recorded (a message the server took is never sent
again), and every other claimed row goes back to ``pending`` with no attempt used. A run
killed outright (SIGKILL) cannot: its rows are claimed again after the lease.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from sqlalchemy import Engine

from backjobs.db import session_scope
from backjobs.jobs import email_queue
from backjobs.jobs.email_drain import Drain
from backjobs.jobs.email_outcome import BUDGET_SPENT, Halt, Tally
from backjobs.jobs.email_pace import Pace
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
    released: int = 0  # claimed, handed back untried: server unavailable, or budget spent
    lost: int = 0  # claimed, but another sender held the row when we acknowledged
    due_now: int = 0  # still due at as_of when the run ended
    waiting: int = 0  # pending, due later (a retry's backoff or a not_before)


class EmailServerUnavailable(RuntimeError):
    """The email transport failed the run — the SMTP server, the pickup folder, or their
    configuration; ``partial_result`` is what the run did before it stopped.

    Its message starts "email transport unavailable: " and then says which, in the
    transport's words ("cannot open SMTP session with …", "SMTP server … answered …",
    "cannot write to the pickup folder … (BACKJOBS_EMAIL_PICKUP_DIR): …").
    """

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
    """Send the emails due at ``now`` that fit in the time budget; count what happened.

    Raises :class:`EmailServerUnavailable` when the server failed the run. When the run is
    stopped (a ``BaseException`` such as Prefect's ``TerminationSignal`` on cancel), the
    sends in progress end and are recorded, every other claimed row goes back to
    ``pending`` with its attempt handed back, and the exception goes on.
    """
    pace = Pace(
        started=monotonic(),
        budget=settings.email_time_budget_seconds,
        probe=settings.email_connections,
        monotonic=monotonic,
    )
    halt = Halt(deadline=pace.deadline, monotonic=monotonic)
    with ThreadPoolExecutor(
        max_workers=settings.email_connections, thread_name_prefix="email-send"
    ) as pool:
        drain = Drain(
            engine, pool, now, wall, settings, transport, rng or random.Random(), halt, pace
        )
        try:
            drain.run()
        except Exception:
            halt.set("the run failed")  # start no send nobody will record
            raise
        except BaseException:
            halt.set("the run was stopped")
            drain.wind_down()
            raise
    return _result(engine, drain.tally, halt=halt, now=now, wall=wall, settings=settings)


def _result(
    engine: Engine,
    tally: Tally,
    *,
    halt: Halt,
    now: datetime,
    wall: Callable[[], datetime],
    settings: Settings,
) -> EmailSendResult:
    """The run's counts with the queue as it ends; raises when the transport failed it."""
    if halt.reason == BUDGET_SPENT and tally.released:
        logger.info(
            "time budget of %g s spent: %d emails handed back untried (no attempt used) "
            "for the next run",
            settings.email_time_budget_seconds,
            tally.released,
        )
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
        logger.error("email transport unavailable, sending stopped: %s", halt.server_reason)
        raise EmailServerUnavailable(
            f"email transport unavailable: {halt.server_reason} "
            f"({result.released} emails handed back untried, no attempt used)",
            result,
        )
    return result
