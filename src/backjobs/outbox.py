"""The email outbox on ``app_tasks``, the app's side: enqueue an email in a transaction.

Enqueue is a *transactional outbox*: the row is written in the caller's session and
transaction (flushed, never committed), so an email exists exactly when the change that
caused it commits. The payload holds what rendering needs later and nothing else::

    {"template": "generic", "to": ["a@example.com"], "context": {...},
     "message_id": "<random@sender-domain>"}

plus, once a recipient was refused, ``delivered_to`` (who has it) and ``refused``
(recipients dropped after a 5xx); a completed row without them reached all of ``to``.
The Message-ID is made once here and reused by every resend.

The sending job's side (claim, renew, acknowledge, count) is
:mod:`backjobs.jobs.email_queue`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Table,
    bindparam,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from backjobs.mail.render import (
    check_recipients,
    new_message_id,
    render_email,
    validate_context,
)
from backjobs.models import AppTask, TaskStatus, TaskType
from backjobs.settings import Settings, get_settings

TASKS = cast(Table, AppTask.__table__)
INT32 = (-(2**31), 2**31 - 1)
MAX_DEDUP_KEY = 255


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


def check_email(email: NewEmail, *, settings: Settings | None = None) -> None:
    """Raise ``ValueError`` naming the field when ``email`` could not be queued.

    The checks :func:`enqueue_emails` makes of each email (addresses, NUL and lone
    surrogates, the template's context model), without rendering or writing: a job screens
    its rows with it, to skip the one bad row instead of failing the whole batch.
    """
    try:
        _email_payload(*email, settings=settings or get_settings(), render=False)
    except TypeError as exc:  # a value of the wrong type where text belongs (SQLite)
        raise ValueError(f"not an email: {exc}") from None


_PG_BULK_INSERT = text("""
    INSERT INTO app_tasks
        (task_type, status, priority, payload, attempts, max_attempts, next_attempt_at)
    SELECT :task_type, :status, :priority, p.value, 0, :max_attempts, :due
    FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS p(value, n)
    ORDER BY p.n
    RETURNING id
""").bindparams(bindparam("due", type_=TASKS.c.next_attempt_at.type))


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
