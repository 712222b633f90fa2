"""Outbox operations for ops and the app: status, retry of failed rows, one row's story.

The Python side of ``backjobs outbox status | retry | show`` (Hangfire's "Retry" on failed
jobs). Every function takes the caller's session and flushes at most: the caller commits
(the CLI does). They look at ``email_send`` rows of ``app_tasks`` only: the outbox.

When a row ended: ``completed_at``, which EmailSendJob sets when a row is sent and when
it fails for good. A failed row without it (failed by an earlier version, or by the app)
counts from the latest of ``next_attempt_at`` (its last attempt was due then; a retry
resets it) and ``created_at``: that can be earlier than the real failure, never later, so
retention (``CleanupJob``'s ``delete_ended_outbox_rows``) never deletes a row earlier than
its retention. :func:`ended_at` is that expression.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, Text, and_, case, func, or_, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.mail.render import sensitive_fields
from backjobs.models import AppTask, TaskStatus, TaskType

log = logging.getLogger(__name__)

TASKS = cast(Table, AppTask.__table__)
EMAIL = TASKS.c.task_type == TaskType.EMAIL_SEND.value
# Where a row may say who already has the message: a column, or a payload key.
DELIVERED_COLUMNS = ("delivered_to", "delivered_recipients", "delivered")
DELIVERED_KEYS = ("delivered_to", "delivered", "delivered_recipients")
_LAST_ERROR_SHOWN = 200
# A claim's owner token (migration 0003), when the table has it: a retried row is nobody's.
_CLEARED_ON_RETRY = {name: None for name in ("claim_token",) if name in TASKS.c}


def ended_at() -> ColumnElement[datetime]:
    """When an ended row ended: ``completed_at``, else the latest of its due time and creation."""
    latest = case(
        (TASKS.c.next_attempt_at > TASKS.c.created_at, TASKS.c.next_attempt_at),
        else_=TASKS.c.created_at,
    )
    return func.coalesce(TASKS.c.completed_at, latest)


@dataclass(frozen=True)
class OutboxStatus:
    """The outbox at ``now``: one flat record (shown by ``backjobs outbox status`` and the UI).

    Two clocks, as for sending: ``now`` (a run's ``as_of``) says what is due; the real
    clock (``at``) says whose lease ran out and what failed in the last 24 hours, since
    leases and failures are recorded on it.

    ``due_now``: pending rows due, plus processing rows whose lease ran out (a crashed
    sender's): what the next run would send. ``waiting_retry``: pending rows not due yet
    (a retry's backoff, or a ``not_before`` delay). ``oldest_due_age_seconds``: how long the
    longest-waiting due row has been due (``None``: nothing due). ``failed_last_24h``: rows
    that failed within 24 hours before ``at`` (see the module on when a row ended).
    """

    pending: int
    processing: int
    completed: int
    failed: int
    due_now: int
    waiting_retry: int
    oldest_due_age_seconds: int | None
    failed_last_24h: int


def outbox_status(session: Session, *, now: datetime, at: datetime | None = None) -> OutboxStatus:
    """Count the outbox's rows by status and by what is due at ``now``.

    ``at`` is the real time (default: ``now``): for leases and the failure window.
    """
    at = now if at is None else at
    pending = TASKS.c.status == TaskStatus.PENDING.value
    processing = TASKS.c.status == TaskStatus.PROCESSING.value
    failed = TASKS.c.status == TaskStatus.FAILED.value
    due_pending = and_(pending, TASKS.c.next_attempt_at <= now)
    lapsed = and_(processing, TASKS.c.locked_until < at)
    due_since = case((due_pending, TASKS.c.next_attempt_at), (lapsed, TASKS.c.locked_until))
    row: Any = session.execute(
        select(
            *(_count(TASKS.c.status == status.value) for status in TaskStatus),
            _count(or_(due_pending, lapsed)),
            _count(and_(pending, TASKS.c.next_attempt_at > now)),
            func.min(due_since),
            _count(and_(failed, ended_at() >= at - timedelta(hours=24))),
        ).where(EMAIL)
    ).one()
    counts = {status: int(value) for status, value in zip(TaskStatus, row[:4], strict=True)}
    oldest: datetime | None = row[6]
    return OutboxStatus(
        pending=counts[TaskStatus.PENDING],
        processing=counts[TaskStatus.PROCESSING],
        completed=counts[TaskStatus.COMPLETED],
        failed=counts[TaskStatus.FAILED],
        due_now=int(row[4]),
        waiting_retry=int(row[5]),
        oldest_due_age_seconds=None
        if oldest is None
        else max(0, int((now - oldest).total_seconds())),
        failed_last_24h=int(row[7]),
    )


def _count(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


class RetryRefused(ValueError):
    """Some of the rows asked for cannot be retried; nothing was changed."""

    def __init__(self, refused: Mapping[int, str]) -> None:
        self.refused = dict(refused)
        reasons = "; ".join(f"app_tasks id {i}: {why}" for i, why in self.refused.items())
        super().__init__(f"only failed outbox rows can be retried, nothing retried: {reasons}")


def retry_failed(
    session: Session,
    *,
    ids: Sequence[int] | None = None,
    failed_since: datetime | None = None,
    now: datetime,
) -> list[int]:
    """Put failed outbox rows back to ``pending`` with fresh attempts; return their ids.

    Either ``ids`` (each must be a ``failed`` email row that can still be sent, else
    :class:`RetryRefused` names every refused one and nothing changes, so a typo never
    half-applies) or ``failed_since`` (every failed row that ended at or after it; for a
    row without ``completed_at`` that is when it was last due, so pick a time a little
    before the trouble began). The rows are locked (``FOR UPDATE`` on PostgreSQL; SQLite's
    writer lock) from the check to the update, so a row retention deletes meanwhile is
    refused as unknown, never skipped silently.

    A row whose template's secret fields were removed when it ended (an expiry warning's
    ``confirmation_link``) can never be sent again: ``ids`` refuses it, saying why;
    ``failed_since`` leaves it out and logs why. (ExpireUnconfirmedRegistrationsJob
    re-issues such a warning's link itself while the registration is open.)

    A retried row gets ``attempts`` 0, ``next_attempt_at`` ``now`` (due at once), no
    lease, no ``completed_at``, and ``last_error`` prefixed with ``[retried <now>]``, so
    ``show`` still tells why it failed. One log line per row. Flushes; the caller commits.
    """
    if (ids is None) == (failed_since is None):
        raise ValueError("retry_failed takes either ids or failed_since, not both or neither")
    failed = and_(EMAIL, TASKS.c.status == TaskStatus.FAILED.value)
    if ids is not None:
        wanted = sorted(set(ids))
        if not wanted:
            raise ValueError("retry_failed: no ids given")
        found = _lock_rows(session, TASKS.c.id.in_([i for i in wanted if _possible_id(i)]))
        refused = {i: _why_not(found.get(i)) for i in wanted if _why_not(found.get(i))}
        if refused:
            raise RetryRefused(refused)
    else:
        since = cast(datetime, failed_since)
        if since.tzinfo is None or since.utcoffset() is None:
            raise ValueError("failed_since must be an aware datetime (UTC)")
        found = _lock_rows(session, and_(failed, ended_at() >= since))
        wanted = []
        for task_id, row in sorted(found.items()):
            why = _why_not(row)
            if why:
                log.warning("outbox task %s: not retried: %s", task_id, why)
            else:
                wanted.append(task_id)
        if not wanted:
            return []
    stamp = f"[retried {now.isoformat(timespec='seconds')}] "
    statement = (
        update(TASKS)
        .where(failed, TASKS.c.id.in_(wanted))
        .values(
            status=TaskStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
            locked_until=None,
            completed_at=None,
            **_CLEARED_ON_RETRY,
            last_error=func.coalesce(stamp + TASKS.c.last_error, stamp.rstrip()),
        )
        .returning(TASKS.c.id, TASKS.c.last_error)
    )
    retried = sorted(session.execute(statement).all())
    for task_id, error in retried:
        shown = (error or "")[len(stamp) : len(stamp) + _LAST_ERROR_SHOWN]
        log.info(
            "outbox task %s: failed -> pending, retried by an operator (was: %s)", task_id, shown
        )
    return [task_id for task_id, _ in retried]


class _Locked(NamedTuple):
    status: str
    payload: str | None


def _lock_rows(session: Session, where: ColumnElement[bool]) -> dict[int, _Locked]:
    """The email rows matching ``where``, locked until the caller's transaction ends."""
    query = select(TASKS.c.id, TASKS.c.status, sql_cast(TASKS.c.payload, Text)).where(EMAIL, where)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=TASKS)
    return {row[0]: _Locked(row[1], row[2]) for row in session.execute(query)}


def _why_not(row: _Locked | None) -> str:
    """Why this row cannot be retried ("" when it can)."""
    if row is None:
        return "no such outbox row"
    if row.status != TaskStatus.FAILED.value:
        return f"status is {row.status}"
    payload, _ = _read_payload(row.payload)
    context = payload.get("context")
    template = payload.get("template")
    if not isinstance(context, dict) or not isinstance(template, str):
        return ""  # the send will say what is wrong with it, as before
    gone = sorted(f for f in sensitive_fields(template) if context.get(f) is None)
    if gone:
        return (
            f"its {', '.join(gone)} was removed when it ended (secrets are not kept), so it "
            "could never be sent; an expiry warning's link is re-issued by "
            "ExpireUnconfirmedRegistrationsJob while the registration is open"
        )
    return ""


# app_tasks.id is a BIGINT: an id outside its range cannot exist, and binding one fails
# (OverflowError on SQLite, "bigint out of range" on PostgreSQL).
MAX_TASK_ID = 2**63 - 1


def _possible_id(task_id: int) -> bool:
    return 1 <= task_id <= MAX_TASK_ID


@dataclass(frozen=True)
class TaskView:
    """One outbox row as ops may see it: no secrets, no rendered body.

    ``context`` holds the template's context without its sensitive fields (their names are
    in ``omitted``). ``delivered`` is who already has the message when the row records it
    (``None``: not recorded); ``refused``, the recipients the server refused for good.
    ``payload_error`` says why the payload could not be read.
    """

    id: int
    status: str
    attempts: int
    max_attempts: int
    priority: int
    created_at: datetime | None
    next_attempt_at: datetime | None
    completed_at: datetime | None
    locked_until: datetime | None
    last_error: str | None
    dedup_key: str | None
    template: str | None
    recipients: tuple[str, ...]
    delivered: tuple[str, ...] | None
    refused: tuple[str, ...] | None
    context: Mapping[str, Any]
    omitted: tuple[str, ...]
    payload_error: str | None = None


def describe_task(session: Session, task_id: int) -> TaskView:
    """The outbox row ``task_id``; ``LookupError`` when there is no such email row."""
    if not _possible_id(task_id):
        raise LookupError(f"no outbox row with id {task_id} (ids run from 1 to {MAX_TASK_ID})")
    shown = [c for c in TASKS.c if c.key != "payload"]
    row = (
        session.execute(
            select(*shown, sql_cast(TASKS.c.payload, Text).label("raw_payload")).where(
                EMAIL, TASKS.c.id == task_id
            )
        )
        .mappings()
        .one_or_none()
    )
    if row is None:
        raise LookupError(f"no outbox row with id {task_id}")
    payload, problem = _read_payload(row["raw_payload"])
    template = payload.get("template") if isinstance(payload.get("template"), str) else None
    context: dict[str, Any] = payload.get("context") or {}
    if not isinstance(context, dict):
        context = {}
    secret = sensitive_fields(template or "")
    return TaskView(
        id=row["id"],
        status=row["status"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        completed_at=row["completed_at"],
        locked_until=row["locked_until"],
        last_error=row["last_error"],
        dedup_key=row["dedup_key"],
        template=template,
        recipients=_addresses(payload.get("to")) or (),
        delivered=_delivered(dict(row), payload),
        refused=_addresses(payload.get("refused")),
        context={k: v for k, v in context.items() if k not in secret},
        omitted=tuple(sorted(k for k in context if k in secret)),
        payload_error=problem,
    )


def _read_payload(raw: str | None) -> tuple[dict[str, Any], str | None]:
    if raw is None:
        return {}, "no payload"
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        return {}, f"payload is not JSON ({exc})"
    if not isinstance(payload, dict):
        return {}, f"payload is a JSON {type(payload).__name__}, not an object"
    return payload, None


def _addresses(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return None


def _delivered(row: Mapping[str, Any], payload: Mapping[str, Any]) -> tuple[str, ...] | None:
    for column in DELIVERED_COLUMNS:
        if column in row and row[column] is not None:
            found = row[column]
            return _addresses(
                json.loads(found) if isinstance(found, str) and found[:1] == "[" else found
            )
    for key in DELIVERED_KEYS:
        if key in payload:
            return _addresses(payload[key])
    return None
