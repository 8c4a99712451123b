"""Alembic environment: runs migrations on the connection the Store hands over (no alembic.ini needed)."""

from alembic import context

from coordinator.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through Store.migrate
    raise RuntimeError("run migrations through `starling-coordinator migrate`")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
