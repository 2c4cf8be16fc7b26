"""The server's part of the `bgjobs` command: `bgjobs serve` and `bgjobs migrate`."""

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from app.api.auth import parse_tokens
from app.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m app.cli serve|migrate`: the server's commands without the client's."""
    parser = argparse.ArgumentParser(prog="bgjobs", description="bgjobs-server: an HTTP job queue")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    args.run(args)


def register(commands: Any) -> None:
    """Add `serve` and `migrate` to the `bgjobs` command (the client's distribution owns
    it and finds this through the `bgjobs.commands` entry-point group)."""
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback with no API tokens (anyone reaching the port "
        "can enqueue, work and delete)",
    )
    serve.set_defaults(run=run_serve)
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(run=lambda args: asyncio.run(migrate_command(settings_of(args))))
    for command in (serve, migrate):
        command.add_argument(
            "--database-url",
            help="SQLAlchemy URL, e.g. sqlite+aiosqlite:///bgjobs.db or "
            "postgresql+asyncpg://user:pw@host/db (default: bgjobs.db here)",
        )


def settings_of(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags given on the command line on top."""
    flags = {
        key: value
        for key, value in vars(args).items()
        if key in ("host", "port", "database_url") and value is not None
    }
    return Settings(**flags)


def run_serve(args: argparse.Namespace) -> None:
    settings = settings_of(args)
    refusal = exposure_refusal(settings, args.insecure)
    if refusal:
        print(f"bgjobs: {refusal}", file=sys.stderr)
        sys.exit(2)
    if args.insecure and exposure_refusal(settings, insecure=False):
        print(
            f"bgjobs: WARNING: open server on {settings.host} (--insecure): anyone who "
            "can reach it can enqueue, lease and delete jobs",
            file=sys.stderr,
        )
    serve_command(settings)


def exposure_refusal(settings: Settings, insecure: bool) -> str | None:
    """Why an open server (no API tokens) must not listen on this address, if it must not."""
    try:
        tokens = parse_tokens(settings.api_tokens, settings.api_tokens_file)
    except (ValueError, OSError) as exc:
        return f"bad API token configuration: {exc}"
    if tokens or insecure or is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} with no API tokens: anyone who can reach it "
        "could enqueue, lease and delete jobs. Set BGJOBS_API_TOKENS (see the README's "
        "Security section), listen on 127.0.0.1, or pass --insecure."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(settings: Settings) -> None:
    import uvicorn

    from app.logs import logging_config
    from app.main import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logging_config(settings),
        access_log=False,  # the app writes its own access lines, with request ids
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
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
