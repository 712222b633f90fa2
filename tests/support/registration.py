"""Users for the registration jobs' tests, written through the models as the app would, and
readers of what the jobs left behind (queued emails, tokens)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import select, text

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


# --- Races on PostgreSQL: a window held open by a lock, never by a sleep ----------------

GATE_KEY = 4242  # the advisory lock a gated trigger waits on while a test holds it
ROW_LOCK_WAITS = frozenset({"transactionid", "tuple"})


def install_gate(db: Database, *, table: str, when: str) -> None:
    """A trigger holding every UPDATE of ``table`` whose rows match ``when`` (SQL over
    ``OLD``/``NEW``) while a test keeps the gate closed (:func:`gate_closed`): the
    statement has its row locks and waits there, with the rest of its transaction."""
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION test_gate() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_KEY}); RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER test_gate BEFORE UPDATE ON {table} FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION test_gate()"
        )


@contextmanager
def gate_closed(db: Database) -> Iterator[None]:
    """Hold the gate: gated updates wait until the block ends."""
    with db.engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({GATE_KEY})")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({GATE_KEY})")
            conn.commit()


def wait_for_lock_waits(
    db: Database,
    *,
    events: frozenset[str],
    count: int = 1,
    timeout: float = 60,
    or_done: threading.Event | None = None,
) -> None:
    """Poll until ``count`` sessions of ``db`` wait on a lock of those ``events``
    (``advisory``, or a row's: :data:`ROW_LOCK_WAITS`), or until ``or_done`` is set."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = ANY(:events)"
    )
    deadline = time.monotonic() + timeout
    with db.engine.connect() as conn:
        while True:
            waiting = conn.execute(query, {"events": sorted(events)}).scalar_one()
            conn.rollback()
            if waiting >= count or (or_done is not None and or_done.is_set()):
                return
            assert time.monotonic() < deadline, f"no session waited on {sorted(events)}"
            time.sleep(0.02)  # polling the condition, not standing in for it


class Outcome:
    """What a call made on another thread returned or raised."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


def on_thread(call: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.value = call()
        except BaseException as exc:  # handed to the test's thread
            outcome.error = exc
        finally:
            outcome.done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome
