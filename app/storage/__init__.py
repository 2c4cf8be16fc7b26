"""Storage backends behind one interface; the database URL picks one."""

from app.queue.ports import Storage
from app.storage.migrate import head_revision


def open_storage(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 10) -> Storage:
    """The backend for a (normalized) SQLAlchemy database URL."""
    if url.startswith("sqlite+aiosqlite:"):
        from app.storage.sqlite import SqliteStorage

        return SqliteStorage(url, synchronous=sqlite_synchronous)
    if url.startswith("postgresql+asyncpg:"):
        from app.storage.postgres import PostgresStorage

        return PostgresStorage(url, pool_size=pool_size)
    raise ValueError(
        f"unsupported database URL {url!r}: use sqlite+aiosqlite:///path.db "
        "or postgresql+asyncpg://user:password@host/database"
    )


async def ensure_schema(storage: Storage, auto_migrate: bool) -> None:
    """Migrate at start-up, or refuse to serve a schema the code does not match."""
    if auto_migrate:
        await storage.migrate()
        return
    current, head = await storage.schema_revision(), head_revision()
    if current != head:
        raise RuntimeError(
            f"the database schema is at revision {current}, this server needs {head}: "
            "run `bgjobs migrate` (or unset BGJOBS_AUTO_MIGRATE=false)"
        )
