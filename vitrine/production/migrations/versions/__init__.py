"""One Alembic revision per schema change of the answers database, oldest first."""
