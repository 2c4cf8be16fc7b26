"""Storage backends behind one interface; the database URL picks one."""

from app.storage.base import Storage


def open_storage(url: str, *, sqlite_synchronous: str = "NORMAL") -> Storage:
    """The backend for a (normalized) SQLAlchemy database URL."""
    if url.startswith("sqlite+aiosqlite:"):
        from app.storage.sqlite import SqliteStorage

        return SqliteStorage(url, synchronous=sqlite_synchronous)
    if url.startswith("postgresql"):
        raise ValueError("the PostgreSQL backend is not available yet; use a sqlite URL")
    raise ValueError(f"unsupported database URL {url!r}: use sqlite+aiosqlite:///path.db")
