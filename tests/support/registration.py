"""Users for the registration jobs' tests, written through the models as the app would, and
readers of what the jobs left behind (queued emails, tokens)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import select

from backjobs.models import AppTask, EmailConfirmationToken, User
from backjobs.settings import Settings, load_settings
from tests.support.databases import Database

TOKEN_IN_LINK = re.compile(r"confirm-email\?token=([A-Za-z0-9_-]+)")


def settings(**overrides: Any) -> Settings:
    """Defaults (3 / 7 / 2 days, base URL http://localhost:8000) unless overridden."""
    return load_settings(**overrides)


def add_user(
    db: Database,
    email: str,
    *,
    created_at: datetime,
    confirmed_at: datetime | None = None,
    status: str = "pending",
    is_admin: bool = False,
    display_name: str | None = None,
    reminded_at: datetime | None = None,
    warned_at: datetime | None = None,
) -> int:
    with db.session() as s:
        user = User(
            email=email,
            display_name=display_name,
            is_admin=is_admin,
            registration_status=status,
            created_at=created_at,
            email_confirmed_at=confirmed_at,
            pending_reminder_sent_at=reminded_at,
            expiry_warning_sent_at=warned_at,
        )
        s.add(user)
        s.commit()
        return user.id


def add_users(db: Database, rows: list[dict[str, Any]]) -> None:
    """Many users in one transaction (``rows``: User column values)."""
    with db.session() as s:
        s.add_all([User(**row) for row in rows])
        s.commit()


def queued(db: Database, template: str | None = None) -> list[dict[str, Any]]:
    """The queued emails' payloads, oldest first (optionally of one template)."""
    with db.session() as s:
        payloads = s.scalars(select(AppTask.payload).order_by(AppTask.id)).all()
    return [p for p in payloads if p is not None and template in (None, p["template"])]


def user(db: Database, user_id: int) -> User:
    with db.session() as s:
        return s.get_one(User, user_id)


def users_by_email(db: Database) -> dict[str, User]:
    with db.session() as s:
        return {u.email: u for u in s.scalars(select(User))}


def tokens(db: Database, user_id: int) -> list[EmailConfirmationToken]:
    with db.session() as s:
        query = select(EmailConfirmationToken).where(EmailConfirmationToken.user_id == user_id)
        return list(s.scalars(query.order_by(EmailConfirmationToken.id)))


def token_in(text: str) -> str:
    """The raw token of the confirmation link in an email's text."""
    found = TOKEN_IN_LINK.search(text)
    assert found is not None, f"no confirmation link in {text!r}"
    return found.group(1)
