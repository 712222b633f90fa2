"""The email outbox on ``app_tasks``: enqueue (app side) and claim / acknowledge (job side).

Enqueue is a *transactional outbox*: the row is written in the caller's session and
transaction (flushed, never committed), so an email exists exactly when the change that
caused it commits. The payload holds what rendering needs later and nothing else::

    {"template": "generic", "to": ["a@example.com"], "context": {...}}

A claim marks due rows ``processing`` with a lease (``locked_until``) in one statement; on
PostgreSQL the inner select takes ``FOR UPDATE SKIP LOCKED``, so concurrent senders never
claim the same row. SQLite serializes writers (``BEGIN IMMEDIATE``), which makes the same
statement correct there too. Acknowledgements only touch rows still held under the
caller's lease, so a sender whose lease ran out cannot undo another's work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.mail.render import check_recipients, render_email, validate_context
from backjobs.models import AppTask, TaskStatus, TaskType
from backjobs.settings import Settings, get_settings

TASKS = cast(Table, AppTask.__table__)
OPEN = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)


@dataclass(frozen=True)
class ClaimedTask:
    """A claimed row: what a sender needs, nothing ORM."""

    id: int
    payload: Any
    attempts: int
    max_attempts: int
    priority: int


@dataclass(frozen=True)
class Retry:
    id: int
    error: str
    next_attempt_at: datetime


@dataclass(frozen=True)
class Failure:
    id: int
    error: str


def enqueue_email(
    session: Session,
    *,
    to: str | Iterable[str],
    template: str,
    context: Mapping[str, Any],
    priority: int = 0,
    dedup_key: str | None = None,
    not_before: datetime | None = None,
    now: datetime | None = None,
    max_attempts: int | None = None,
    settings: Settings | None = None,
) -> int:
    """Queue an email in the caller's transaction; return its ``app_tasks`` id.

    ``to`` is one address or several; ``context`` must fit ``template``'s model and render.
    Anything wrong (unknown template, bad address, a line break in an address or subject,
    a context that doesn't fit) raises ``ValueError`` and writes nothing. With a
    ``dedup_key`` already queued, the existing task's id is returned and nothing is added.
    ``not_before`` delays the first attempt; ``now`` is the app's clock (default: now, UTC).
    ``max_attempts`` defaults to ``BACKJOBS_EMAIL_MAX_ATTEMPTS``. The session is flushed,
    never committed: the caller's commit or rollback decides.
    """
    recipients = check_recipients(to)
    data = validate_context(template, context)
    render_email(template, data)  # fails now, in the app, rather than at send time
    due = _aware(not_before or now or datetime.now(UTC), what="not_before/now")
    values = {
        "task_type": TaskType.EMAIL_SEND.value,
        "status": TaskStatus.PENDING.value,
        "priority": priority,
        "payload": {"template": template, "to": recipients, "context": data},
        "attempts": 0,
        "max_attempts": max_attempts or (settings or get_settings()).email_max_attempts,
        "next_attempt_at": due,
        "dedup_key": dedup_key,
    }
    if dedup_key is None:
        return int(session.execute(insert(TASKS).values(values).returning(TASKS.c.id)).scalar_one())
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = (
        dialect_insert(TASKS)
        .values(values)
        .on_conflict_do_nothing(index_elements=["dedup_key"])
        .returning(TASKS.c.id)
    )
    inserted = session.execute(statement).scalar_one_or_none()
    if inserted is not None:
        return int(inserted)
    # Someone queued it first (perhaps concurrently: ON CONFLICT waited for their commit).
    existing = select(TASKS.c.id).where(TASKS.c.dedup_key == dedup_key)
    return int(session.execute(existing).scalar_one())


class NewEmail(NamedTuple):
    """One email for :func:`enqueue_emails`: recipients, template, context."""

    to: str | Sequence[str]
    template: str
    context: Mapping[str, Any]


def enqueue_emails(
    session: Session,
    emails: Sequence[NewEmail],
    *,
    now: datetime,
    priority: int = 0,
    settings: Settings | None = None,
) -> list[int]:
    """Queue several emails in the caller's transaction in one multi-row INSERT.

    Each is checked as :func:`enqueue_email` checks it (addresses, the template's context
    model) before anything is written, and each template is test-rendered once per call
    (contexts its model accepted render alike): one bad email raises ``ValueError`` and
    nothing is queued. Due at ``now``; no dedup keys. For jobs that queue thousands of
    emails in a batch, where a round trip (and a render) per row would dominate. Returns
    the new ids, ascending (in the order of ``emails``).
    """
    if not emails:
        return []
    due = _aware(now, what="now")
    max_attempts = (settings or get_settings()).email_max_attempts
    payloads = []
    rendered: set[str] = set()
    for email in emails:
        recipients = check_recipients(email.to)
        data = validate_context(email.template, email.context)
        if email.template not in rendered:
            render_email(email.template, data)
            rendered.add(email.template)
        payloads.append({"template": email.template, "to": recipients, "context": data})
    common = {
        "task_type": TaskType.EMAIL_SEND.value,
        "status": TaskStatus.PENDING.value,
        "priority": priority,
        "max_attempts": max_attempts,
        "due": due,
    }
    if session.get_bind().dialect.name == "postgresql":
        # One JSON parameter: psycopg would spend longer converting thousands of
        # placeholders than PostgreSQL spends inserting the rows.
        params = {**common, "payloads": json.dumps(payloads)}
        return sorted(int(i) for i in session.execute(_PG_BULK_INSERT, params).scalars())
    rows = [
        {**{k: v for k, v in common.items() if k != "due"}, "payload": payload,
         "attempts": 0, "next_attempt_at": due}
        for payload in payloads
    ]  # fmt: skip
    statement = insert(TASKS).returning(TASKS.c.id, sort_by_parameter_order=True)
    return [int(task_id) for task_id in session.execute(statement, rows).scalars()]


_PG_BULK_INSERT = text("""
    INSERT INTO app_tasks
        (task_type, status, priority, payload, attempts, max_attempts, next_attempt_at)
    SELECT :task_type, :status, :priority, p.value, 0, :max_attempts, :due
    FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS p(value, n)
    ORDER BY p.n
    RETURNING id
""").bindparams(bindparam("due", type_=TASKS.c.next_attempt_at.type))


def due_condition(*, now: datetime) -> ColumnElement[bool]:
    """Email rows to send at ``now``: pending and due, or processing with a lapsed lease."""
    return and_(
        TASKS.c.task_type == TaskType.EMAIL_SEND.value,
        # Implied by the next term; spelled out so both databases read ix_app_tasks_due.
        TASKS.c.status.in_(OPEN),
        or_(
            and_(TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.next_attempt_at <= now),
            and_(TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until < now),
        ),
    )


def claim_due(
    session: Session, *, now: datetime, lease_until: datetime, limit: int
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due rows (priority desc, then age) in one statement.

    Two locked candidate sets, each read through its own index: pending rows in claim
    order (the partial index ``ix_app_tasks_claim`` on pending rows only) and rows whose
    lease ran out; the best ``limit`` of them are claimed. Claimed rows leave the partial
    index, so the entries a long drain leaves behind are never rewritten and PostgreSQL
    marks them dead once: claims stay cheap over a drain of any length.

    ``attempts`` counts delivery attempts started, so it is raised here: a message that
    keeps killing its sender still runs out of attempts.
    """
    order = (TASKS.c.priority.desc(), TASKS.c.created_at, TASKS.c.id)
    columns = (TASKS.c.id, TASKS.c.priority, TASKS.c.created_at)
    email = TASKS.c.task_type == TaskType.EMAIL_SEND.value
    fresh = (
        select(*columns)
        .where(email, TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.next_attempt_at <= now)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("fresh")
    )
    lapsed = (
        select(*columns)
        .where(email, TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until < now)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("lapsed")
    )
    candidates = union_all(select(fresh), select(lapsed)).subquery("candidates")
    chosen = (
        select(candidates.c.id)
        .order_by(candidates.c.priority.desc(), candidates.c.created_at, candidates.c.id)
        .limit(limit)
    )
    statement = (
        update(TASKS)
        .where(TASKS.c.id.in_(chosen.scalar_subquery()))
        .values(
            status=TaskStatus.PROCESSING.value,
            locked_until=lease_until,
            attempts=TASKS.c.attempts + 1,
        )
        .returning(
            TASKS.c.id, TASKS.c.payload, TASKS.c.attempts, TASKS.c.max_attempts, TASKS.c.priority
        )
    )
    rows = [ClaimedTask(*row) for row in session.execute(statement)]
    rows.sort(key=lambda row: (-row.priority, row.id))
    return rows


def mark_sent(
    session: Session,
    *,
    ids: Sequence[int],
    lease_until: datetime,
    now: datetime,
    details: Mapping[int, tuple[Any, str | None]] | None = None,
) -> None:
    """``completed`` at ``now``; ``details`` gives some rows a new payload and a note."""
    details = details or {}
    done = {"status": TaskStatus.COMPLETED.value, "completed_at": now, "locked_until": None}
    plain = [task_id for task_id in ids if task_id not in details]
    if plain:
        session.execute(
            update(TASKS).where(TASKS.c.id.in_(plain), _owned(lease_until)).values(done)
        )
    if details:
        statement = (
            update(TASKS)
            .where(TASKS.c.id == bindparam("task_id"), _owned(lease_until))
            .values(
                {
                    **done,
                    "payload": bindparam("new_payload", type_=TASKS.c.payload.type),
                    "last_error": bindparam("note"),
                }
            )
        )
        params = [
            {"task_id": key, "new_payload": payload, "note": note}
            for key, (payload, note) in details.items()
        ]
        session.execute(statement, params)


def mark_retry(session: Session, *, retries: Sequence[Retry], lease_until: datetime) -> None:
    """Back to ``pending`` with the error and the next attempt's time."""
    if retries:
        statement = (
            update(TASKS)
            .where(TASKS.c.id == bindparam("task_id"), _owned(lease_until))
            .values(
                status=TaskStatus.PENDING.value,
                locked_until=None,
                last_error=bindparam("error"),
                next_attempt_at=bindparam("due", type_=TASKS.c.next_attempt_at.type),
            )
        )
        params = [{"task_id": r.id, "error": r.error, "due": r.next_attempt_at} for r in retries]
        session.execute(statement, params)


def mark_failed(session: Session, *, failures: Sequence[Failure], lease_until: datetime) -> None:
    """``failed`` for good, with the reason in ``last_error``."""
    if failures:
        statement = (
            update(TASKS)
            .where(TASKS.c.id == bindparam("task_id"), _owned(lease_until))
            .values(status=TaskStatus.FAILED.value, locked_until=None, last_error=bindparam("e"))
        )
        session.execute(statement, [{"task_id": f.id, "e": f.error} for f in failures])


def release(session: Session, *, ids: Sequence[int], lease_until: datetime) -> None:
    """Back to ``pending``, untried: the claim's attempt is handed back, nothing recorded."""
    if ids:
        statement = (
            update(TASKS)
            .where(TASKS.c.id.in_(ids), _owned(lease_until))
            .values(
                status=TaskStatus.PENDING.value, locked_until=None, attempts=TASKS.c.attempts - 1
            )
        )
        session.execute(statement)


def count_due(session: Session, *, now: datetime) -> int:
    """Email rows still due at ``now`` (the job's ``left``)."""
    return int(
        session.execute(
            select(func.count()).select_from(TASKS).where(due_condition(now=now))
        ).scalar_one()
    )


def _owned(lease_until: datetime) -> ColumnElement[bool]:
    return and_(TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until == lease_until)


def _aware(value: datetime, *, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC)")
    return value
