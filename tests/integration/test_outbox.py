"""enqueue_email: a transactional outbox on app_tasks, validated up front, deduplicated."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from backjobs.models import AppTask, User
from backjobs.outbox import enqueue_email
from backjobs.settings import load_settings
from tests.support.databases import Database

NOW = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
GENERIC = {"subject": "Hello", "body": "Text"}


def task_count(db: Database) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(AppTask)).scalar_one())


def test_rolled_back_enqueue_leaves_no_row(db: Database) -> None:
    with db.session() as s:
        s.add(User(email="new@example.com"))
        enqueue_email(s, to="new@example.com", template="generic", context=GENERIC, now=NOW)
        s.rollback()
    assert task_count(db) == 0


def test_committed_enqueue_stores_what_rendering_needs(db: Database) -> None:
    settings = load_settings(email_max_attempts=7)
    with db.session() as s:
        task_id = enqueue_email(
            s,
            to=["a@example.com", "b@example.com"],
            template="generic",
            context=GENERIC,
            priority=3,
            now=NOW,
            settings=settings,
        )
        s.commit()
    with db.session() as s:
        task = s.get_one(AppTask, task_id)
        assert (task.task_type, task.status, task.priority) == ("email_send", "pending", 3)
        assert (task.attempts, task.max_attempts, task.next_attempt_at) == (0, 7, NOW)
        assert task.payload is not None
        message_id = task.payload.pop("message_id")
        assert task.payload == {
            "template": "generic",
            "to": ["a@example.com", "b@example.com"],
            "context": GENERIC,
        }
        # Made once, here, with a random part: unique across databases and resets.
        assert re.fullmatch(r"<[0-9a-f]{32}@localhost>", message_id)


def test_not_before_delays_the_first_attempt(db: Database) -> None:
    later = NOW + timedelta(hours=2)
    with db.session() as s:
        task_id = enqueue_email(
            s, to="a@example.com", template="generic", context=GENERIC, not_before=later, now=NOW
        )
        s.commit()
        assert s.get_one(AppTask, task_id).next_attempt_at == later


def test_dedup_key_returns_the_existing_task(db: Database) -> None:
    with db.session() as s:
        first = enqueue_email(
            s, to="a@example.com", template="generic", context=GENERIC, dedup_key="k1", now=NOW
        )
        s.commit()
    with db.session() as s:
        again = enqueue_email(
            s, to="b@example.com", template="generic", context=GENERIC, dedup_key="k1", now=NOW
        )
        other = enqueue_email(
            s, to="b@example.com", template="generic", context=GENERIC, dedup_key="k2", now=NOW
        )
        s.commit()
    assert again == first != other
    assert task_count(db) == 2


@pytest.mark.parametrize(
    ("to", "template", "context", "message"),
    [
        ("not-an-address", "generic", GENERIC, "invalid email address"),
        ("a@example.com\r\nBcc: evil@example.com", "generic", GENERIC, "one line"),
        ([], "generic", GENERIC, "at least one recipient"),
        ("a@example.com", "no_such_template", GENERIC, "unknown email template"),
        ("a@example.com", "generic", {"subject": "Hi"}, "body"),
        ("a@example.com", "generic", {**GENERIC, "extra": 1}, "extra"),
        ("a@example.com", "generic", {"subject": "Hi\r\nBcc: x@y.z", "body": "b"}, "one line"),
        ("a@example.com", "registration_expired", {"expired_at": "soon"}, "expired_at"),
    ],
)
def test_bad_input_raises_and_writes_nothing(
    db: Database, to: Any, template: str, context: dict[str, Any], message: str
) -> None:
    with db.session() as s:
        with pytest.raises(ValueError, match=message):
            enqueue_email(s, to=to, template=template, context=context, now=NOW)
        s.commit()
    assert task_count(db) == 0


@pytest.mark.postgres
def test_concurrent_dedup_on_postgres_makes_one_row(pg_db: Database) -> None:
    """The second enqueue waits for the first transaction, then returns its id."""
    first_session = pg_db.session()
    first = enqueue_email(
        first_session,
        to="a@example.com",
        template="generic",
        context=GENERIC,
        dedup_key="race",
        now=NOW,
    )
    ids: list[int] = []

    def second() -> None:
        with pg_db.session() as s:
            ids.append(
                enqueue_email(
                    s,
                    to="a@example.com",
                    template="generic",
                    context=GENERIC,
                    dedup_key="race",
                    now=NOW,
                )
            )
            s.commit()

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive(), "the second enqueue should wait on the first's uncommitted row"
    first_session.commit()
    first_session.close()
    thread.join(timeout=10)
    assert ids == [first]
    assert task_count(pg_db) == 1


@pytest.mark.parametrize(
    ("field", "kwargs", "context"),
    [
        ("dedup_key", {"dedup_key": "k" * 256}, GENERIC),
        ("priority", {"priority": 2**31}, GENERIC),
        ("priority", {"priority": -(2**31) - 1}, GENERIC),
        ("max_attempts", {"max_attempts": 0}, GENERIC),
        ("max_attempts", {"max_attempts": -3}, GENERIC),
        ("context.body", {}, {"subject": "Hello", "body": "a\x00b"}),
        ("context.body", {}, {"subject": "Hello", "body": "lone \ud800 surrogate"}),
        ("dedup_key", {"dedup_key": "nul\x00key"}, GENERIC),
    ],
)
def test_values_the_database_would_refuse_raise_before_any_sql(
    db: Database, field: str, kwargs: dict[str, Any], context: dict[str, Any]
) -> None:
    """Issue 8, case 8: a ValueError naming the field; the caller's transaction goes on."""
    with db.session() as s:
        s.add(User(email="kept@example.com"))
        s.flush()
        with pytest.raises(ValueError, match=re.escape(field)):
            enqueue_email(
                s, to="a@example.com", template="generic", context=context, now=NOW, **kwargs
            )
        # On PostgreSQL a failed statement would have aborted the transaction.
        assert s.execute(text("SELECT count(*) FROM users")).scalar_one() == 1
        enqueue_email(s, to="a@example.com", template="generic", context=GENERIC, now=NOW)
        s.commit()
    assert task_count(db) == 1


def test_max_attempts_limits_are_kept(db: Database) -> None:
    with db.session() as s:
        one = enqueue_email(
            s, to="a@example.com", template="generic", context=GENERIC, now=NOW, max_attempts=1
        )
        edge = enqueue_email(
            s,
            to="a@example.com",
            template="generic",
            context=GENERIC,
            now=NOW,
            priority=2**31 - 1,
            dedup_key="k" * 255,
        )
        s.commit()
    with db.session() as s:
        assert s.get_one(AppTask, one).max_attempts == 1
        assert s.get_one(AppTask, edge).priority == 2**31 - 1
