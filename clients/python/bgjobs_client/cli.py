"""The `bgjobs` command: a worker for any language (`work`) and operator commands.

The server's distribution adds `serve` and `migrate` through the `bgjobs.commands`
entry-point group: each entry is a function that adds its subcommands to the parser.
"""

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

from bgjobs_client.client import AsyncClient, Client
from bgjobs_client.command import command_handler
from bgjobs_client.errors import BgjobsError
from bgjobs_client.models import Job
from bgjobs_client.worker import Worker

DEFAULT_URL = "http://127.0.0.1:8000"
DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
Command = Callable[[argparse.Namespace], int | None]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except BgjobsError as exc:
        print(f"bgjobs: {exc}", file=sys.stderr)
        status = 1
    except OSError as exc:
        print(f"bgjobs: {exc}", file=sys.stderr)
        status = 1
    sys.exit(status or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgjobs", description="bgjobs: an HTTP job queue")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_work(commands)
    add_operator_commands(commands)
    for entry in entry_points(group="bgjobs.commands"):
        entry.load()(commands)
    return parser


def connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("BGJOBS_URL", DEFAULT_URL),
        help=f"the server (env BGJOBS_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("BGJOBS_TOKEN"),
        help="API token (env BGJOBS_TOKEN)",
    )


# -- work ----------------------------------------------------------------------------------


def add_work(commands: Any) -> None:
    work = commands.add_parser(
        "work",
        help="run a command once per job",
        description="Run COMMAND once per job: the payload on stdin, the job in BGJOBS_JOB_ID, "
        "BGJOBS_JOB_NAME, BGJOBS_ATTEMPTS and BGJOBS_MAX_RETRIES. Exit 0 acks; another "
        "status fails the job (with the end of stderr); past --timeout it gets SIGTERM, "
        "then SIGKILL, and fails. SIGTERM or SIGINT drains the worker.",
        usage="bgjobs work [--url URL] [--token T] --name NAME [--name NAME ...] "
        "[--concurrency N] [--timeout SECONDS] -- COMMAND [ARGS ...]",
    )
    connection(work)
    work.add_argument("--name", action="append", required=True, help="job name (repeatable)")
    work.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    work.add_argument("--timeout", type=float, help="seconds a run may take (default: none)")
    work.add_argument("--lease-ms", type=int, default=30_000, help="lease length (30000)")
    work.add_argument("--worker-id", help="how this worker shows in leases (host-pid)")
    work.add_argument(
        "--shutdown-timeout", type=float, default=25.0, help="drain time on SIGTERM (25 s)"
    )
    work.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS ...]")
    work.set_defaults(run=run_work)


def run_work(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise BgjobsError("work needs a command after --, e.g. bgjobs work --name N -- ./job.sh")
    client = AsyncClient(args.url, args.token)
    worker = Worker(
        client,
        args.worker_id,
        args.concurrency,
        lease_ms=args.lease_ms,
        shutdown_timeout=args.shutdown_timeout,
    )
    handler = command_handler(argv, args.timeout)
    for name in args.name:
        worker.handler(name)(handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    worker.run()
    return 0


# -- operator commands ---------------------------------------------------------------------


def add_operator_commands(commands: Any) -> None:
    enqueue = operator(commands, "enqueue", "enqueue a job", run_enqueue)
    enqueue.add_argument("name")
    source = enqueue.add_mutually_exclusive_group()
    source.add_argument("--payload", help="the payload (default: stdin when piped, else empty)")
    source.add_argument("--payload-file", help="read the payload from this file")
    when = enqueue.add_mutually_exclusive_group()
    when.add_argument("--in", dest="delay", type=duration_ms, help="delay: 500ms, 5s, 10m, 2h, 1d")
    when.add_argument("--at", help="when, RFC 3339 (e.g. 2026-12-01T09:00:00Z)")
    enqueue.add_argument("--max-retries", type=int)
    enqueue.add_argument("--priority", type=int, help="0-9, lower runs first (default 0)")

    jobs = operator(commands, "jobs", "list jobs", run_jobs)
    jobs.add_argument(
        "--state", choices=["available", "scheduled", "reserved", "succeeded", "failed"]
    )
    jobs.add_argument("--name")
    jobs.add_argument("--limit", type=int, default=50)

    for name, help_text, run in (
        ("retry", "put a failed job back in the queue", run_retry),
        ("cancel", "delete a pending or finished job", run_cancel),
    ):
        operator(commands, name, help_text, run).add_argument("id")
    operator(commands, "stats", "counts by state and name", run_stats)

    queue = operator(commands, "queue", "show or change a job name's settings", run_queue)
    queue.add_argument("name", nargs="?", help="the job name (none: list every queue)")
    pause = queue.add_mutually_exclusive_group()
    pause.add_argument("--pause", action="store_true", help="stop leasing its jobs")
    pause.add_argument("--resume", action="store_true", help="lease its jobs again")
    queue.add_argument(
        "--concurrency-limit", type=limit_of, help="at most N leases at once; 'none' removes it"
    )
    queue.add_argument(
        "--rate-limit", type=rate_of, help="e.g. 10/1s: at most 10 leases a second; 'none'"
    )


def operator(commands: Any, name: str, help_text: str, run: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
    connection(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(run=run)
    return parser


def duration_ms(text: str) -> int:
    match = DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 500ms, 5s, 10m, 2h, 1d")
    return int(match[1]) * UNIT_MS[match[2]]


def client_of(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token)


def run_enqueue(args: argparse.Namespace) -> None:
    payload = read_payload(args)
    with client_of(args) as client:
        job = client.enqueue(
            args.name,
            payload,
            available_in_ms=args.delay,
            available_at=args.at,
            max_retries=args.max_retries,
            priority=args.priority,
        )
    show(args, [job], json_of=job_json(job))


def read_payload(args: argparse.Namespace) -> str:
    if args.payload is not None:
        return str(args.payload)
    if args.payload_file is not None:
        with open(args.payload_file, encoding="utf-8") as file:
            return file.read()
    return "" if sys.stdin.isatty() else sys.stdin.read()


def run_jobs(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        page = client.list_jobs(args.state, args.name, args.limit)
    show(args, page.items, json_of=[job_json(job) for job in page.items])


def run_retry(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        job = client.retry(args.id)
    show(args, [job], json_of=job_json(job))


def run_cancel(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        client.cancel(args.id)
    if args.json:
        print(json.dumps({"id": args.id, "state": "deleted"}))
    else:
        print(f"deleted {args.id}")


def run_stats(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return
    states = ("available", "scheduled", "reserved", "succeeded", "failed")
    header = ["name", *states, "oldest_available", "ok/min", "failed/min"]
    rows = [stats_row(entry["name"], entry, states) for entry in stats["names"]]
    rows.append(stats_row("(total)", stats["totals"], states))
    print(table(header, rows))


def stats_row(name: str, entry: dict[str, Any], states: Sequence[str]) -> list[str]:
    age = entry.get("oldest_available_age_ms")
    return [
        name,
        *(str(entry["counts"][state]) for state in states),
        "-" if age is None else f"{age / 1000:.1f}s",
        str(entry["last_minute"]["succeeded"]),
        str(entry["last_minute"]["failed"]),
    ]


# -- output --------------------------------------------------------------------------------


def job_json(job: Job) -> dict[str, Any]:
    fields = {name: getattr(job, name) for name in Job.__slots__}
    return {
        key: value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value
        for key, value in fields.items()
        if value is not None
    }


def show(args: argparse.Namespace, jobs: list[Job], json_of: Any) -> None:
    if args.json:
        print(json.dumps(json_of, indent=2))
        return
    header = ["id", "name", "state", "attempts", "when", "payload"]
    print(table(header, [job_row(job) for job in jobs]))


def job_row(job: Job) -> list[str]:
    when = job.failed_at or job.succeeded_at or job.available_at
    payload = job.payload if len(job.payload) <= 40 else job.payload[:37] + "..."
    return [job.id, job.name, job.state, str(job.attempts), ago(when), payload]


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - datetime.now(UTC)).total_seconds()
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text} (in {seconds:.0f}s)" if seconds > 1 else text


NONE = "none"  # a limit given as 'none' is removed


def limit_of(text: str) -> int | str:
    if text.strip().lower() == NONE:
        return NONE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def rate_of(text: str) -> dict[str, int] | str:
    if text.strip().lower() == NONE:
        return NONE
    count, _, per = text.partition("/")
    if not count.strip().isdigit() or not per:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 10/1s, or 'none'")
    return {"count": int(count), "per_ms": duration_ms(per)}


def run_queue(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if args.pause or args.resume:
        changes["paused"] = bool(args.pause)
    for key, value in (
        ("concurrency_limit", args.concurrency_limit),
        ("rate_limit", args.rate_limit),
    ):
        if value is not None:
            changes[key] = None if value == NONE else value
    with client_of(args) as client:
        if args.name is None:
            if changes:
                raise BgjobsError("name the queue to change")
            queues = client.queues()
        elif changes:
            queues = [client.configure_queue(args.name, **changes)]
        else:
            queues = [q for q in client.queues() if q["name"] == args.name]
    if args.json:
        print(json.dumps(queues if args.name is None else queues[0] if queues else None))
        return
    header = ["name", "paused", "concurrency", "rate", "available", "reserved"]
    print(table(header, [queue_row(queue) for queue in queues]))


def queue_row(queue: dict[str, Any]) -> list[str]:
    rate = queue["rate_limit"]
    return [
        queue["name"],
        "yes" if queue["paused"] else "no",
        "-" if queue["concurrency_limit"] is None else str(queue["concurrency_limit"]),
        "-" if rate is None else f"{rate['count']}/{rate['per_ms']}ms",
        str(queue["counts"]["available"]),
        str(queue["counts"]["reserved"]),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


if __name__ == "__main__":
    main()
