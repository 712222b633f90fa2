"""enqueue_emails: many emails in one INSERT, checked like enqueue_email, all or nothing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from backjobs.models import AppTask
from backjobs.outbox import NewEmail, enqueue_email, enqueue_emails
from tests.support.databases import Database

NOW = datetime(2026, 1, 10, 5, 0, tzinfo=UTC)
GENERIC = {"subject": "Hello", "body": "Text"}


def payloads(db: Database) -> list[object]:
    with db.session() as s:
        return list(s.scalars(select(AppTask.payload).order_by(AppTask.id)))


def test_queues_each_email_as_enqueue_email_would(db: Database) -> None:
    with db.session() as s:
        single = enqueue_email(s, to="a@example.com", template="generic", context=GENERIC, now=NOW)
        ids = enqueue_emails(
            s,
            [NewEmail(f"u{i}@example.com", "generic", GENERIC) for i in range(3)],
            now=NOW,
        )
        s.commit()
    assert ids == [single + 1, single + 2, single + 3]
    stored = payloads(db)
    message_ids = [p.pop("message_id") for p in stored]  # type: ignore[attr-defined]
    assert len(set(message_ids)) == 4  # one of its own each, as enqueue_email makes
    assert stored[1:] == [
        {"template": "generic", "to": [f"u{i}@example.com"], "context": GENERIC} for i in range(3)
    ]
    with db.session() as s:
        rows = s.scalars(select(AppTask).where(AppTask.id.in_(ids))).all()
        assert {(r.status, r.next_attempt_at, r.attempts, r.max_attempts) for r in rows} == {
            ("pending", NOW, 0, 5)
        }


@pytest.mark.parametrize(
    "bad",
    [
        NewEmail("not an address", "generic", GENERIC),
        NewEmail("b@example.com", "generic", {"subject": "x"}),
        NewEmail("b@example.com", "no_such_template", GENERIC),
    ],
)
def test_one_bad_email_queues_nothing(db: Database, bad: NewEmail) -> None:
    with db.session() as s, pytest.raises(ValueError):
        enqueue_emails(s, [NewEmail("a@example.com", "generic", GENERIC), bad], now=NOW)
    assert payloads(db) == []
