"""EmailSendJob's time budget: how many emails a claim may take, judged from the run's pace.

A run has ``BACKJOBS_EMAIL_TIME_BUDGET_SECONDS`` (monotonic, from its start). Claiming
more than it can send in what is left would hold rows another run could send, and end
in a batch sent whole long after the budget (issue 19: 251 s under a 90 s budget with a
server taking 5 s a message). So :meth:`Pace.room` sizes each claim:

- before any send was answered the rate is unknown: one email per connection (a probe),
  and no second claim while it is in flight;
- then ``rate * time left - emails claimed and not yet sent``, at most a batch, where
  ``rate`` is the emails the server answered per second of the run so far (all
  connections together, the database's round trips included: on the safe side).

The budget also stops the sending itself (:class:`backjobs.jobs.email_outcome.Halt`):
once it is spent no send starts, and the claimed rows not tried go back to ``pending``
with their attempt handed back. A send already in progress ends first, within
``BACKJOBS_SMTP_TIMEOUT_SECONDS`` (which bounds a message's whole SMTP exchange).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Pace:
    """The run's budget and the sends answered so far (thread-safe)."""

    started: float
    budget: float
    probe: int  # emails in the first claim: one per connection
    monotonic: Callable[[], float]
    answered: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline(self) -> float:
        return self.started + self.budget

    def count(self) -> None:
        """One send answered by the server (or decided without it)."""
        with self._lock:
            self.answered += 1

    def room(self, *, unsent: int, limit: int) -> int:
        """How many emails the next claim may take (0: none now)."""
        now = self.monotonic()
        left = self.deadline - now
        if left <= 0:
            return 0
        with self._lock:
            answered = self.answered
        if answered == 0:
            return min(limit, self.probe) if unsent == 0 else 0
        rate = answered / max(now - self.started, 1e-6)
        return max(0, min(limit, math.floor(rate * left) - unsent))
