"""The `bgjobs` console command."""

import argparse
from collections.abc import Sequence

from app.settings import Settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bgjobs", description="bgjobs-server: an HTTP job queue")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument(
        "--database-url",
        help="SQLAlchemy URL, e.g. sqlite+aiosqlite:///bgjobs.db (default: bgjobs.db here)",
    )
    args = parser.parse_args(argv)
    serve_command(args)


def serve_command(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    overrides = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("database_url", args.database_url),
        )
        if value is not None
    }
    settings = Settings(**overrides)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
