"""network routes: routes, their routing peers, and each peer's chosen exit node

Revision ID: 0004
Revises: 0003

Policies name routes in their destinations inside the existing `endpoints` JSON column
(`destinations.routes`: route ids), like groups and peers: no column for them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("prefix", sa.String(length=18), nullable=False),
        sa.Column("masquerade", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "route_routers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("route_id", sa.String(length=32), nullable=False),
        sa.Column("peer_id", sa.String(length=32), nullable=True),
        sa.Column("group_id", sa.String(length=32), nullable=True),
        sa.Column("metric", sa.Integer(), nullable=False),
        sa.CheckConstraint("(peer_id IS NULL) <> (group_id IS NULL)", name="ck_route_routers_peer_or_group"),
        sa.ForeignKeyConstraint(["route_id"], ["routes.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["peer_id"], ["peers.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_route_routers_route_id", "route_routers", ["route_id"])
    op.create_index("ix_route_routers_peer_id", "route_routers", ["peer_id"])
    op.create_index("ix_route_routers_group_id", "route_routers", ["group_id"])
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a column with its REFERENCES clause in place; a batch rebuild of `peers` would drop
        # the table, and with foreign keys on that deletes every row that references a peer (cascade).
        op.execute(
            "ALTER TABLE peers ADD COLUMN exit_node_id VARCHAR(32) "
            "CONSTRAINT fk_peers_exit_node_id REFERENCES peers (id) ON DELETE SET NULL"
        )
    else:
        op.add_column("peers", sa.Column("exit_node_id", sa.String(length=32), nullable=True))
        op.create_foreign_key("fk_peers_exit_node_id", "peers", "peers", ["exit_node_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE peers DROP COLUMN exit_node_id")
    else:
        op.drop_constraint("fk_peers_exit_node_id", "peers", type_="foreignkey")
        op.drop_column("peers", "exit_node_id")
    op.drop_index("ix_route_routers_group_id", table_name="route_routers")
    op.drop_index("ix_route_routers_peer_id", table_name="route_routers")
    op.drop_index("ix_route_routers_route_id", table_name="route_routers")
    op.drop_table("route_routers")
    op.drop_table("routes")
