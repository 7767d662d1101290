"""The answers database's Alembic migrations (env.py, versions/), run by RecordStore.migrate."""
