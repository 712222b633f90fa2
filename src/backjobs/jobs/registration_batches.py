"""Keyset batches of users for the registration jobs, each batch its own transaction.

:func:`run_batches` calls a batch step (``warn_batch``, ``decline_batch`` of
:mod:`backjobs.jobs.expire_unconfirmed_registrations`) with the last id seen, in a fresh
transaction each time, until a batch comes back short: memory stays flat, and a failure
keeps the batches committed before it. The run's clock (``now``) is passed through; the
real clock is read once per batch (``at``). A statement's parameters may hold confirmation
links, so a failing statement's are hidden before the error goes on to logs and run states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import StatementError

from backjobs.db import session_scope
from backjobs.settings import Settings

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Batch:
    """What one batch (or all of them, added) did; ``last_id``: where the next starts."""

    scanned: int
    last_id: int
    done: int = 0
    unwarned: int = 0
    invalid: int = 0

    def then(self, batch: Batch) -> Batch:
        return Batch(
            scanned=self.scanned + batch.scanned,
            last_id=batch.last_id,
            done=self.done + batch.done,
            unwarned=self.unwarned + batch.unwarned,
            invalid=self.invalid + batch.invalid,
        )


BatchStep = Callable[..., Batch]


def run_batches(
    engine: Engine, step: BatchStep, *, now: datetime, settings: Settings, wall: Clock
) -> Batch:
    """Run ``step`` batch after batch of ``BACKJOBS_REGISTRATION_BATCH_SIZE``; the total."""
    total = Batch(scanned=0, last_id=0)
    limit = settings.registration_batch_size
    while True:
        try:
            with session_scope(engine) as session:
                batch = step(
                    session,
                    after_id=total.last_id,
                    now=now,
                    at=wall(),
                    settings=settings,
                    limit=limit,
                )
        except StatementError as exc:
            # Its parameters hold confirmation links: keep them out of logs and run states.
            exc.hide_parameters, exc.params = True, None
            raise
        total = total.then(batch)
        if batch.scanned < limit:
            return total
