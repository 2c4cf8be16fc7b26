"""The `bgjobs` console command: `bgjobs serve` and `bgjobs migrate`."""

import argparse
import asyncio
from collections.abc import Sequence

from app.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bgjobs", description="bgjobs-server: an HTTP job queue")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    for command in (serve, migrate):
        command.add_argument(
            "--database-url",
            help="SQLAlchemy URL, e.g. sqlite+aiosqlite:///bgjobs.db or "
            "postgresql+asyncpg://user:pw@host/db (default: bgjobs.db here)",
        )
    args = parser.parse_args(argv)
    settings = Settings(
        **{
            key: value
            for key, value in vars(args).items()
            if key in ("host", "port", "database_url") and value is not None
        }
    )
    if args.command == "serve":
        serve_command(settings)
    else:
        asyncio.run(migrate_command(settings))


def serve_command(settings: Settings) -> None:
    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


async def migrate_command(settings: Settings) -> None:
    from app.storage import open_storage
    from app.storage.migrate import head_revision

    storage = open_storage(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        await storage.migrate()
        print(
            f"database schema is at revision {await storage.schema_revision()} "
            f"(head {head_revision()})"
        )
    finally:
        await storage.close()


if __name__ == "__main__":
    main()
