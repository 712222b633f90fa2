"""The outbox against a real SMTP server, for the EmailSendJob fault tests: settings that
point the job at a server (:func:`point_at`), rows queued (:func:`enqueue`) and read back.

    point_at(monkeypatch, smtp_server, email_connections=1)
    task_id = enqueue(db, "a@example.com")
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.smtp import SENDER, SmtpServer

if TYPE_CHECKING:
    import pytest

GENERIC = {"subject": "Hello", "body": "World"}


def real_now() -> datetime:
    return datetime.now(UTC)


def enqueue(db: Database, to: str | list[str], *, now: datetime | None = None, **kw: Any) -> int:
    template = kw.pop("template", "generic")
    context = kw.pop("context", GENERIC)
    with db.session() as s:
        task_id = enqueue_email(
            s, to=to, template=template, context=context, now=now or real_now(), **kw
        )
        s.commit()
    return task_id


def row(db: Database, task_id: int) -> AppTask:
    with db.session() as s:
        return s.get_one(AppTask, task_id)


def rows(db: Database) -> list[AppTask]:
    with db.session() as s:
        return list(s.query(AppTask).order_by(AppTask.id))


def setenv(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    for key, value in values.items():
        monkeypatch.setenv(f"BACKJOBS_{key.upper()}", str(value))
    get_settings.cache_clear()


def point_at(monkeypatch: pytest.MonkeyPatch, server: SmtpServer, **more: object) -> None:
    setenv(
        monkeypatch,
        email_transport="smtp",
        smtp_host=server.host,
        smtp_port=server.port,
        smtp_timeout_seconds=10,
        email_from=SENDER,
        **more,
    )
