"""An index for EmailSendJob's claim: pending rows in priority, then age, order.

Without it every claim sorts all pending rows, so draining n emails costs O(n^2).
Partial (pending rows only): a claimed row leaves it, and completed and failed rows, the
bulk of the table over time, never enter it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_index(
        "ix_app_tasks_claim",
        "app_tasks",
        ["task_type", sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_app_tasks_claim", table_name="app_tasks")
