"""Alembic's environment for the answers database.

RecordStore.migrate hands over its connection (config.attributes["connection"]), inside its
transaction and migration lock. Run by hand (`alembic -x url=<URL> upgrade head` with a
script_location of this folder), the URL is the -x argument or VITRINE_RECORD_URL.
"""

from __future__ import annotations

import os

from alembic import context

from vitrine.production import reviews  # noqa: F401  (its table is part of the schema)
from vitrine.production.records import create_engine, metadata


def run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ["VITRINE_RECORD_URL"]
    engine = create_engine(url)
    try:
        with engine.begin() as own:
            context.configure(connection=own, target_metadata=metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run()
