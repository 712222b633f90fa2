"""The email outbox on ``app_tasks``: enqueue (app side) and claim / acknowledge (job side).

Enqueue is a *transactional outbox*: the row is written in the caller's session and
transaction (flushed, never committed), so an email exists exactly when the change that
caused it commits. The payload holds what rendering needs later and nothing else::

    {"template": "generic", "to": ["a@example.com"], "context": {...},
     "message_id": "<random@sender-domain>"}

plus, once a recipient was refused, ``delivered_to`` (who has it) and ``refused``
(recipients dropped after a 5xx); a completed row without them reached all of ``to``.
The Message-ID is made once here and reused by every resend.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Table,
    Text,
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
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from backjobs.mail.render import (
    check_recipients,
    new_message_id,
    render_email,
    validate_context,
)
from backjobs.models import AppTask, TaskStatus, TaskType
from backjobs.settings import Settings, get_settings

TASKS = cast(Table, AppTask.__table__)
OPEN = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
INT32 = (-(2**31), 2**31 - 1)
MAX_DEDUP_KEY = 255


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
    ``max_attempts`` defaults to ``BACKJOBS_EMAIL_MAX_ATTEMPTS``. Values the database
    would refuse (a ``dedup_key`` over 255 characters, a priority outside 32 bits,
    ``max_attempts`` below 1, a NUL or lone surrogate in any string) raise ``ValueError``
    naming the field before any SQL runs, so the caller's transaction stays usable. The
    session is flushed, never committed: the caller's commit or rollback decides.
    """
    settings = settings or get_settings()
    _check_fields(priority=priority, dedup_key=dedup_key, max_attempts=max_attempts)
    payload = _email_payload(to, template, context, settings=settings, render=True)
    due = _aware(not_before or now or datetime.now(UTC), what="not_before/now")
    values = {
        "task_type": TaskType.EMAIL_SEND.value,
        "status": TaskStatus.PENDING.value,
        "priority": priority,
        "payload": payload,
        "attempts": 0,
        "max_attempts": settings.email_max_attempts if max_attempts is None else max_attempts,
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
    settings = settings or get_settings()
    _check_fields(priority=priority, dedup_key=None, max_attempts=None)
    payloads = []
    rendered: set[str] = set()
    for email in emails:
        # Test-render each template once: contexts its model accepted render alike.
        first = email.template not in rendered
        payloads.append(_email_payload(*email, settings=settings, render=first))
        rendered.add(email.template)
    common = {
        "task_type": TaskType.EMAIL_SEND.value,
        "status": TaskStatus.PENDING.value,
        "priority": priority,
        "max_attempts": settings.email_max_attempts,
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


def claim_due(
    session: Session,
    *,
    now: datetime,
    at: datetime,
    lease_until: datetime,
    limit: int,
    token: str,
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due rows (priority desc, then age) in one statement.

    ``now`` is the job's as_of (what is due); ``at`` the real time (which leases lapsed);
    ``lease_until`` the new lease, on the real clock; ``token`` the claim's owner token.

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
        .where(email, TASKS.c.status == TaskStatus.PROCESSING.value, TASKS.c.locked_until < at)
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
    failed = {**done, "status": TaskStatus.FAILED.value}
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


def _email_payload(
    to: str | Iterable[str],
    template: str,
    context: Mapping[str, Any],
    *,
    settings: Settings,
    render: bool,
) -> dict[str, Any]:
    """A checked payload; ``render`` also test-renders it (fails in the app, not at send)."""
    _check_strings(to, what="to")
    _check_strings(template, what="template")
    _check_strings(context, what="context")
    recipients = check_recipients(to)
    data = validate_context(template, context)
    if render:
        render_email(template, data)
    return {
        "template": template,
        "to": recipients,
        "context": data,
        "message_id": new_message_id(sender=settings.email_from),
    }


def _parse_payload(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        return MalformedPayload(f"payload is not JSON: {exc}")


def _check_fields(*, priority: int, dedup_key: str | None, max_attempts: int | None) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, not {type(priority).__name__}")
    if not INT32[0] <= priority <= INT32[1]:
        raise ValueError(f"priority {priority} is outside {INT32[0]}..{INT32[1]}")
    if dedup_key is not None:
        _check_strings(dedup_key, what="dedup_key")
        if len(dedup_key) > MAX_DEDUP_KEY:
            raise ValueError(f"dedup_key is {len(dedup_key)} characters; at most 255")
    if max_attempts is not None and (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= INT32[1]
    ):
        raise ValueError(f"max_attempts must be an integer of at least 1, not {max_attempts!r}")


def _check_strings(value: Any, *, what: str) -> None:
    """Refuse a NUL or a lone surrogate anywhere in ``value`` (PostgreSQL cannot store them)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{what} contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} contains a lone surrogate (not valid Unicode)") from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_strings(key, what=f"{what} key")
            _check_strings(item, what=f"{what}.{key}")
    elif isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            _check_strings(item, what=f"{what}[{index}]")


def _aware(value: datetime, *, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC)")
    return value
