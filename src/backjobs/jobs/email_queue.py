"""The email outbox on ``app_tasks``, the sending job's side: claim, renew, acknowledge.

Rows are written by :func:`backjobs.outbox.enqueue_email` (payload described there).

Two clocks. ``as_of`` (the job's clock) decides only what is *due*: a pending row whose
``next_attempt_at <= as_of``. Everything that coordinates live senders runs on the real
clock, read when the statement is built (``at``): the lease (``locked_until``), whether a
lease has lapsed, and retry backoff. A late run with an old ``as_of`` therefore never
takes a live lease, and an ad hoc run with a far-future ``as_of`` never pushes a retry
beyond real now + backoff.

A claim marks due rows ``processing`` with a lease and a fresh owner token
(``claim_token``, uuid hex) in one statement; on PostgreSQL the inner select takes
``FOR UPDATE SKIP LOCKED``, so concurrent senders never claim the same row. SQLite
serializes writers (``BEGIN IMMEDIATE``), which makes the same statement correct there
too. Renewals and acknowledgements match on the token: a sender whose lease was taken
over cannot undo the new owner's work, and :func:`acknowledge` reports the rows it lost.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Select,
    Table,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.models import AppTask, TaskStatus, TaskType

TASKS = cast(Table, AppTask.__table__)
OPEN = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)


class MalformedPayload(str):
    """A stored payload that is not JSON: the reason, in place of the payload."""


@dataclass(frozen=True)
class ClaimedTask:
    """A claimed row: what a sender needs, nothing ORM."""

    id: int
    payload: Any
    attempts: int
    max_attempts: int
    priority: int


@dataclass(frozen=True)
class Sent:
    id: int
    note: str | None = None  # recipients that did not get it, else None (last_error cleared)
    payload: Any = None  # a new payload (delivered_to, secrets cleared), else unchanged


@dataclass(frozen=True)
class Retry:
    id: int
    error: str
    next_attempt_at: datetime
    payload: Any = None


@dataclass(frozen=True)
class Failure:
    id: int
    error: str
    payload: Any = None


@dataclass(frozen=True)
class Acks:
    """What became of one claim's rows; ``released`` go back untried (attempt handed back)."""

    sent: Sequence[Sent] = ()
    retries: Sequence[Retry] = ()
    failures: Sequence[Failure] = ()
    released: Sequence[int] = field(default_factory=tuple)


def due_condition(*, now: datetime, at: datetime) -> ColumnElement[bool]:
    """Email rows to send: pending and due at ``now`` (as_of), or processing with a lease
    that lapsed before ``at`` (the real clock)."""
    return and_(
        TASKS.c.task_type == TaskType.EMAIL_SEND.value,
        # Implied by the next term; spelled out so both databases read ix_app_tasks_due.
        TASKS.c.status.in_(OPEN),
        or_(
            and_(TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.next_attempt_at <= now),
            and_(TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until < at),
        ),
    )


def _best_candidates(
    *, now: datetime, at: datetime, limit: int, skip: Collection[int]
) -> Select[tuple[int]]:
    """The ids of the best ``limit`` of the due pending rows and the lapsed leases, locked."""
    order = (TASKS.c.priority.desc(), TASKS.c.created_at, TASKS.c.id)
    columns = (TASKS.c.id, TASKS.c.priority, TASKS.c.created_at)
    email = TASKS.c.task_type == TaskType.EMAIL_SEND.value
    pending = [email, TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.next_attempt_at <= now]
    if skip:
        pending.append(TASKS.c.id.not_in(list(skip)))
    fresh = (
        select(*columns)
        .where(*pending)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("fresh")
    )
    lapsed = (
        select(*columns)
        .where(email, TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until < at)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("lapsed")
    )
    candidates = union_all(select(fresh), select(lapsed)).subquery("candidates")
    return (
        select(candidates.c.id)
        .order_by(candidates.c.priority.desc(), candidates.c.created_at, candidates.c.id)
        .limit(limit)
    )


def claim_due(
    session: Session,
    *,
    now: datetime,
    at: datetime,
    lease_until: datetime,
    limit: int,
    token: str,
    skip: Collection[int] = (),
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due rows (priority desc, then age) in one statement.

    ``now`` is the job's as_of (what is due); ``at`` the real time (which leases lapsed);
    ``lease_until`` the new lease, on the real clock; ``token`` the claim's owner token;
    ``skip`` pending rows not to take (those this sender already retried: with an as_of
    ahead of the real clock, a retry's backoff would not keep it from coming due again).

    Two locked candidate sets, each read through its own index: pending rows in claim
    order (the partial index ``ix_app_tasks_claim`` on pending rows only) and rows whose
    lease ran out; the best ``limit`` of them are claimed. Claimed rows leave the partial
    index, so the entries a long drain leaves behind are never rewritten and PostgreSQL
    marks them dead once: claims stay cheap over a drain of any length.

    ``attempts`` counts delivery attempts started, so it is raised here: a message that
    keeps killing its sender still runs out of attempts. The payload is read as text and
    parsed here, so a row whose payload is not JSON comes back as a
    :class:`MalformedPayload` instead of breaking the claim for every row.
    """
    chosen = _best_candidates(now=now, at=at, limit=limit, skip=skip)
    statement = (
        update(TASKS)
        .where(TASKS.c.id.in_(chosen.scalar_subquery()))
        .values(
            status=TaskStatus.PROCESSING.value,
            locked_until=lease_until,
            claim_token=token,
            attempts=TASKS.c.attempts + 1,
        )
        .returning(
            TASKS.c.id,
            sql_cast(TASKS.c.payload, Text),
            TASKS.c.attempts,
            TASKS.c.max_attempts,
            TASKS.c.priority,
        )
    )
    rows = [
        ClaimedTask(task_id, _parse_payload(raw), attempts, max_attempts, priority)
        for task_id, raw, attempts, max_attempts, priority in session.execute(statement)
    ]
    rows.sort(key=lambda row: (-row.priority, row.id))
    return rows


def renew(session: Session, *, tokens: Sequence[str], lease_until: datetime) -> int:
    """Extend the lease of every row still held under ``tokens``; return how many."""
    if not tokens:
        return 0
    statement = (
        update(TASKS)
        .where(TASKS.c.claim_token.in_(tokens), TASKS.c.status == TaskStatus.PROCESSING.value)
        .values(locked_until=lease_until)
    )
    return int(cast(CursorResult[Any], session.execute(statement)).rowcount)


def release_held(session: Session, *, tokens: Sequence[str]) -> int:
    """Hand back every row still held under ``tokens``, untried: ``pending`` again, due as
    before, its attempt given back. For a sender that stops before deciding its claims."""
    if not tokens:
        return 0
    statement = (
        update(TASKS)
        .where(TASKS.c.claim_token.in_(tokens), TASKS.c.status == TaskStatus.PROCESSING.value)
        .values(
            status=TaskStatus.PENDING.value,
            locked_until=None,
            claim_token=None,
            attempts=TASKS.c.attempts - 1,
        )
    )
    return int(cast(CursorResult[Any], session.execute(statement)).rowcount)


def acknowledge(session: Session, *, token: str, at: datetime, acks: Acks) -> list[int]:
    """Record one claim's outcomes on the rows still held under ``token``.

    Returns the ids that were no longer ours (the lease lapsed and another sender took
    the row, or an operator changed it): their outcome is not written.
    """
    decided: list[Sent | Retry | Failure] = [*acks.sent, *acks.retries, *acks.failures]
    ids = [a.id for a in decided] + list(acks.released)
    if not ids:
        return []
    held = set(
        session.execute(
            select(TASKS.c.id).where(TASKS.c.id.in_(ids), _owned(token)).with_for_update()
        ).scalars()
    )
    done = {"locked_until": None, "claim_token": None}
    completed = {**done, "status": TaskStatus.COMPLETED.value, "completed_at": at}
    _update_each(session, token, [s for s in acks.sent if s.id in held], completed, "note")
    pending = {**done, "status": TaskStatus.PENDING.value}
    retries = [r for r in acks.retries if r.id in held]
    _update_each(session, token, retries, pending, "error", due=True)
    # completed_at is when the row ended, sent or failed for good: retention and
    # ``outbox status``'s "failed in the last 24 h" count from it.
    failed = {**done, "status": TaskStatus.FAILED.value, "completed_at": at}
    _update_each(session, token, [f for f in acks.failures if f.id in held], failed, "error")
    released = [task_id for task_id in acks.released if task_id in held]
    if released:
        session.execute(
            update(TASKS)
            .where(TASKS.c.id.in_(released), _owned(token))
            .values(**pending, attempts=TASKS.c.attempts - 1)
        )
    return [task_id for task_id in ids if task_id not in held]


def _update_each(
    session: Session,
    token: str,
    rows: Sequence[Sent | Retry | Failure],
    values: Mapping[str, Any],
    text_field: str,
    *,
    due: bool = False,
) -> None:
    plain = [r.id for r in rows if r.payload is None and getattr(r, text_field) is None]
    if plain and not due:  # the common case (sent, nothing to note): one statement
        session.execute(
            update(TASKS)
            .where(TASKS.c.id.in_(plain), _owned(token))
            .values({**values, "last_error": None})
        )
        done = set(plain)
        rows = [r for r in rows if r.id not in done]
    # One executemany per shape: rows with a new payload, rows keeping theirs.
    for new_payload in (False, True):
        group = [r for r in rows if (r.payload is not None) is new_payload]
        if not group:
            continue
        columns: dict[str, Any] = {**values, "last_error": bindparam("text_value")}
        if due:
            columns["next_attempt_at"] = bindparam("due", type_=TASKS.c.next_attempt_at.type)
        if new_payload:
            columns["payload"] = bindparam("new_payload", type_=TASKS.c.payload.type)
        statement = (
            update(TASKS).where(TASKS.c.id == bindparam("task_id"), _owned(token)).values(columns)
        )
        params = []
        for r in group:
            param = {"task_id": r.id, "text_value": getattr(r, text_field)}
            if due:
                param["due"] = cast(Retry, r).next_attempt_at
            if new_payload:
                param["new_payload"] = r.payload
            params.append(param)
        session.execute(statement, params)


@dataclass(frozen=True)
class QueueCounts:
    due_now: int  # still due at as_of (or with a lapsed lease)
    waiting: int  # pending, not yet due: a retry's backoff or a later not_before


def count_queue(session: Session, *, now: datetime, at: datetime) -> QueueCounts:
    """Email rows still due at ``now`` and pending rows waiting for a later time."""
    waiting = and_(
        TASKS.c.task_type == TaskType.EMAIL_SEND.value,
        TASKS.c.status == TaskStatus.PENDING.value,
        TASKS.c.next_attempt_at > now,
    )
    due = select(func.count()).select_from(TASKS).where(due_condition(now=now, at=at))
    later = select(func.count()).select_from(TASKS).where(waiting)
    return QueueCounts(
        due_now=int(session.execute(due).scalar_one()),
        waiting=int(session.execute(later).scalar_one()),
    )


def _owned(token: str) -> ColumnElement[bool]:
    return and_(TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.claim_token == token)


def _parse_payload(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        return MalformedPayload(f"payload is not JSON: {exc}")
