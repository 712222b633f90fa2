"""An index for EmailSendJob's claim: due rows in priority, then age, order.

Without it every claim sorts all open rows, so draining n emails costs O(n^2). Partial
(open rows only): completed and failed rows, the bulk of the table over time, stay out.

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

OPEN = sa.text("status IN ('pending', 'processing')")


def upgrade() -> None:
    op.create_index(
        "ix_app_tasks_claim",
        "app_tasks",
        ["task_type", sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_app_tasks_claim", table_name="app_tasks")
