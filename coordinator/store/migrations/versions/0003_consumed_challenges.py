"""consumed challenges of sealed requests (proof of possession, single use)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consumed_challenges",
        sa.Column("nonce", sa.String(length=32), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_consumed_challenges_expires_at", "consumed_challenges", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_consumed_challenges_expires_at", table_name="consumed_challenges")
    op.drop_table("consumed_challenges")
