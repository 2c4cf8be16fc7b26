"""Alembic environment for both backends.

The server runs migrations on a connection it already holds (`config.attributes
["connection"]`), inside its own transaction; the `alembic` command line gets a fresh
async engine for the URL in BGJOBS_DATABASE_URL.
"""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import app.storage.tables  # noqa: F401  (registers the tables on the metadata)
from app.settings import Settings

target_metadata = SQLModel.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_command_line() -> None:
    engine = create_async_engine(Settings().database_url)
    async with engine.begin() as conn:
        await conn.run_sync(run_migrations)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    asyncio.run(run_from_command_line())
