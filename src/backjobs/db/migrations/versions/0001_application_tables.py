"""The application tables of DESIGN.md's contract.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(19, 4).with_variant(sa.String(40), "sqlite")
PAYLOAD = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
NOW = sa.text("CURRENT_TIMESTAMP")


def _id() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("id", ID, sa.Identity(), primary_key=True)


def _owner(name: str = "owner_id") -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("display_name", sa.String(200)),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("registration_status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("email_confirmed_at", TS),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.Column("pending_reminder_sent_at", TS),
        sa.Column("expiry_warning_sent_at", TS),
    )
    op.create_index("uq_users_email_lower", "users", [sa.text("lower(email)")], unique=True)

    op.create_table(
        "email_confirmation_tokens",
        _id(),
        _owner("user_id"),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
    )
    op.create_index(
        "ix_email_confirmation_tokens_user_id", "email_confirmation_tokens", ["user_id"]
    )

    op.create_table(
        "refresh_tokens",
        _id(),
        _owner("user_id"),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
    )
    op.create_index("ix_refresh_tokens_user_id", "refresh_tokens", ["user_id"])
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])

    op.create_table(
        "markers",
        _id(),
        _owner(),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("deleted_at", TS),
    )
    op.create_index("ix_markers_owner_id", "markers", ["owner_id"])
    op.create_index("ix_markers_deleted_at", "markers", ["deleted_at"])

    op.create_table(
        "stored_files",
        _id(),
        _owner(),
        sa.Column("storage_key", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("processing_status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
    )
    op.create_index("ix_stored_files_owner_id", "stored_files", ["owner_id"])
    op.create_index(
        "ix_stored_files_status_created", "stored_files", ["processing_status", "created_at"]
    )

    op.create_table(
        "app_tasks",
        _id(),
        sa.Column("task_type", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("payload", PAYLOAD),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("next_attempt_at", TS, server_default=NOW),
        sa.Column("locked_until", TS),
        sa.Column("last_error", sa.Text()),
        sa.Column("dedup_key", sa.String(255), unique=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.Column("completed_at", TS),
    )
    op.create_index("ix_app_tasks_due", "app_tasks", ["task_type", "status", "next_attempt_at"])

    op.create_table(
        "recurring_transactions",
        _id(),
        _owner(),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("description", sa.String(500)),
        sa.Column("frequency", sa.String(16), nullable=False),
        sa.Column("interval", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("start_date", sa.Date(), nullable=False),
        sa.Column("end_date", sa.Date()),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("last_processed_date", sa.Date()),
    )
    op.create_index("ix_recurring_transactions_owner_id", "recurring_transactions", ["owner_id"])

    op.create_table(
        "transactions",
        _id(),
        _owner(),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("description", sa.String(500)),
        sa.Column("occurred_on", sa.Date(), nullable=False),
        sa.Column(
            "recurring_transaction_id",
            ID,
            sa.ForeignKey("recurring_transactions.id", ondelete="SET NULL"),
        ),
        sa.Column("created_at", TS, server_default=NOW, nullable=False),
        sa.UniqueConstraint(
            "recurring_transaction_id",
            "occurred_on",
            name="uq_transactions_recurring_transaction_id",
        ),
    )
    op.create_index("ix_transactions_owner_id", "transactions", ["owner_id"])


def downgrade() -> None:
    for table in (
        "transactions",
        "recurring_transactions",
        "app_tasks",
        "stored_files",
        "markers",
        "refresh_tokens",
        "email_confirmation_tokens",
        "users",
    ):
        op.drop_table(table)
