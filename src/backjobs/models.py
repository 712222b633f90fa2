"""The application's tables (the contract in DESIGN.md): names are fixed, the app owns them.

Columns added by backjobs are nullable or have a server default, so the app's own inserts
keep working. Enumerations are stored as lowercase strings; the ``StrEnum`` classes below
name the values, but the columns accept any string so that bad data can be reported
rather than crash a load.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from backjobs.db.types import Money, UTCDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IdType = BigInteger().with_variant(Integer(), "sqlite")
PayloadType = JSON().with_variant(JSONB(), "postgresql")


class RegistrationStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DECLINED = "declined"


class ProcessingStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class TaskStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class TaskType(StrEnum):
    EMAIL_SEND = "email_send"


class Frequency(StrEnum):
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    YEARLY = "yearly"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _id() -> Mapped[int]:
    return mapped_column(IdType, Identity(), primary_key=True)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, server_default=func.current_timestamp())


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("uq_users_email_lower", func.lower(text("email")), unique=True),)

    id: Mapped[int] = _id()
    email: Mapped[str] = mapped_column(String(320))
    display_name: Mapped[str | None] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    registration_status: Mapped[str] = mapped_column(
        String(16), server_default=RegistrationStatus.PENDING.value
    )
    email_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created_at()
    pending_reminder_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expiry_warning_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EmailConfirmationToken(Base):
    __tablename__ = "email_confirmation_tokens"

    id: Mapped[int] = _id()
    user_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created_at()


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[int] = _id()
    user_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = _created_at()


class Marker(Base):
    __tablename__ = "markers"

    id: Mapped[int] = _id()
    owner_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    title: Mapped[str] = mapped_column(String(500))
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class StoredFile(Base):
    __tablename__ = "stored_files"
    __table_args__ = (Index("ix_stored_files_status_created", "processing_status", "created_at"),)

    id: Mapped[int] = _id()
    owner_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    processing_status: Mapped[str] = mapped_column(
        String(16), server_default=ProcessingStatus.PENDING.value
    )
    created_at: Mapped[datetime] = _created_at()


class AppTask(Base):
    __tablename__ = "app_tasks"
    __table_args__ = (Index("ix_app_tasks_due", "task_type", "status", "next_attempt_at"),)

    id: Mapped[int] = _id()
    task_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.PENDING.value)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    payload: Mapped[dict[str, Any] | None] = mapped_column(PayloadType)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("5"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, server_default=func.current_timestamp()
    )
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    dedup_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = _created_at()
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The owner of a live claim (EmailSendJob, migration 0003): renewals and acks match it.
    claim_token: Mapped[str | None] = mapped_column(String(32))


# EmailSendJob's claim order over pending rows (migration 0002).
Index(
    "ix_app_tasks_claim",
    AppTask.task_type,
    AppTask.priority.desc(),
    AppTask.created_at,
    AppTask.id,
    postgresql_where=text("status = 'pending'"),
    sqlite_where=text("status = 'pending'"),
)


class RecurringTransaction(Base):
    __tablename__ = "recurring_transactions"

    id: Mapped[int] = _id()
    owner_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    description: Mapped[str | None] = mapped_column(String(500))
    frequency: Mapped[str] = mapped_column(String(16))
    interval: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    start_date: Mapped[date] = mapped_column(Date)
    end_date: Mapped[date | None] = mapped_column(Date)
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    last_processed_date: Mapped[date | None] = mapped_column(Date)


class Transaction(Base):
    __tablename__ = "transactions"
    __table_args__ = (UniqueConstraint("recurring_transaction_id", "occurred_on"),)

    id: Mapped[int] = _id()
    owner_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    amount: Mapped[Decimal] = mapped_column(Money)
    currency: Mapped[str] = mapped_column(String(3))
    description: Mapped[str | None] = mapped_column(String(500))
    occurred_on: Mapped[date] = mapped_column(Date)
    recurring_transaction_id: Mapped[int | None] = mapped_column(
        IdType, ForeignKey("recurring_transactions.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _created_at()
