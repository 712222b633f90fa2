"""The migration builds the contract's schema on an empty database of either kind."""

from __future__ import annotations

import warnings
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from backjobs import models
from backjobs.db.migrate import alembic_config, current_revision, upgrade
from tests.support.databases import Database

CONTRACT = {
    "users": {
        "id",
        "email",
        "display_name",
        "is_admin",
        "registration_status",
        "email_confirmed_at",
        "created_at",
        "pending_reminder_sent_at",
        "expiry_warning_sent_at",
    },
    "email_confirmation_tokens": {
        "id",
        "user_id",
        "token_hash",
        "expires_at",
        "used_at",
        "created_at",
    },
    "refresh_tokens": {"id", "user_id", "token_hash", "expires_at", "revoked_at", "created_at"},
    "markers": {"id", "owner_id", "title", "deleted_at"},
    "stored_files": {
        "id",
        "owner_id",
        "storage_key",
        "size_bytes",
        "processing_status",
        "created_at",
    },
    "app_tasks": {
        "id",
        "task_type",
        "status",
        "priority",
        "payload",
        "attempts",
        "max_attempts",
        "next_attempt_at",
        "locked_until",
        "last_error",
        "dedup_key",
        "created_at",
        "completed_at",
    },
    "recurring_transactions": {
        "id",
        "owner_id",
        "amount",
        "currency",
        "description",
        "frequency",
        "interval",
        "start_date",
        "end_date",
        "enabled",
        "last_processed_date",
    },
    "transactions": {
        "id",
        "owner_id",
        "amount",
        "currency",
        "description",
        "occurred_on",
        "recurring_transaction_id",
        "created_at",
    },
}


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_migration_creates_the_contract_tables(db: Database) -> None:
    inspector = inspect(db.engine)
    for table, columns in CONTRACT.items():
        assert {c["name"] for c in inspector.get_columns(table)} >= columns, table
    assert current_revision(db.engine) == head_revision()


def test_models_match_the_migration(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        with warnings.catch_warnings():
            # SQLite cannot reflect the lower(email) index; PostgreSQL compares it.
            warnings.simplefilter("ignore")
            diff = compare_metadata(context, models.Base.metadata)
    assert diff == []


def test_upgrade_on_an_empty_sqlite_file_and_again(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/nested/app.db"
    upgrade(url)
    upgrade(url)  # a second upgrade is a no-op


def test_email_is_unique_case_insensitively(db: Database) -> None:
    with db.session() as s:
        s.add(models.User(email="Ann@Example.com"))
        s.commit()
        s.add(models.User(email="ann@example.COM"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_timestamps_come_back_aware_utc_and_amounts_exact(db: Database) -> None:
    paris = timezone(timedelta(hours=1))
    with db.session() as s:
        user = models.User(
            email="a@example.com", email_confirmed_at=datetime(2030, 1, 1, 1, tzinfo=paris)
        )
        s.add(user)
        s.flush()
        s.add(
            models.RecurringTransaction(
                owner_id=user.id,
                amount=Decimal("1234567.8901"),
                currency="EUR",
                frequency="monthly",
                start_date=date(2030, 1, 31),
            )
        )
        s.commit()
    with db.session() as s:
        loaded = s.scalars(select(models.User)).one()
        assert loaded.email_confirmed_at == datetime(2030, 1, 1, 0, tzinfo=UTC)
        assert loaded.email_confirmed_at.tzinfo is not None
        assert loaded.created_at.tzinfo is not None
        assert loaded.registration_status == "pending"
        rt = s.scalars(select(models.RecurringTransaction)).one()
        assert rt.amount == Decimal("1234567.8901") and rt.interval == 1 and rt.enabled


def test_naive_datetimes_are_refused(db: Database) -> None:
    with db.session() as s:
        s.add(models.User(email="b@example.com", email_confirmed_at=datetime(2030, 1, 1)))
        with pytest.raises(Exception, match="naive datetime"):
            s.flush()


@pytest.mark.postgres
def test_upgrade_on_an_empty_postgres_database(pg_template: str) -> None:
    from tests.support.databases import drop_pg_database, new_pg_database

    name, url = new_pg_database("template0")
    try:
        upgrade(url)
        upgrade(url)
        from backjobs.db import make_engine

        engine = make_engine(url)
        assert current_revision(engine) == head_revision()
        assert set(CONTRACT) <= set(inspect(engine).get_table_names())
        engine.dispose()
    finally:
        drop_pg_database(name)
