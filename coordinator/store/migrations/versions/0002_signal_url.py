"""signal service URL in mesh settings

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mesh_settings") as batch:
        batch.add_column(sa.Column("signal_url", sa.String(length=255), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("mesh_settings") as batch:
        batch.drop_column("signal_url")
