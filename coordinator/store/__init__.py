"""Persistence for the coordinator: SQLAlchemy models, the Store facade and Alembic migrations."""

from coordinator.store.database import Store, StoreError

__all__ = ["Store", "StoreError"]
