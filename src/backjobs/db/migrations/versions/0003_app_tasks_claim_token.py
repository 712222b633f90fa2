"""An owner token for EmailSendJob's claims: ``app_tasks.claim_token``.

A claim writes a fresh random token (uuid hex) on the rows it leases; renewals and
acknowledgements match on it, so a sender whose lease was taken over can neither extend
nor overwrite the new owner's work, and it learns that it lost the row. Nullable: the
app's own inserts never set it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("app_tasks", sa.Column("claim_token", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("app_tasks") as batch:
        batch.drop_column("claim_token")
