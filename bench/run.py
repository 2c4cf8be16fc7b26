"""Benchmark bgjobs-server against its performance targets; prints figures, asserts nothing.

Run from the repository root:

    .venv/bin/python bench/run.py --quick                       # SQLite, about 2 minutes
    .venv/bin/python bench/run.py --backend postgres            # full sizes, up to 10 minutes

The server (`python -m app.cli serve`) runs as a child pinned to core 0; the load
generators (wrk for single requests, bench/loadgen.py on aiohttp for lease and ack loops)
and this script are pinned to core 1. Everything is talked to over HTTP; only prefills
without a batch endpoint write the database directly (bench/backends.py). Every child is
stopped in a `finally`, also on Ctrl-C and SIGTERM. See bench/README.md for each row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from backends import PostgresBackend, SqliteBackend
from children import (
    BENCH_DIR,
    REPO_ROOT,
    BenchError,
    Children,
    cpu_seconds,
    free_port,
    http,
    pinned,
    status_kib,
    status_line,
    tree_cpu_seconds,
    wait_ready,
)
from loadgen import PAYLOAD
from machine import (
    busy_cpu_seconds,
    code_under_test,
    describe_disk,
    describe_machine,
    load_average,
    own_cpu_seconds,
    settle_disk,
    wait_for_quiet,
    workdir_parent,
)
from report import Report, Row

# One job name per measurement, so that no row sees another's jobs.
ENQUEUE, PICKUP, IDLE, BATCH = "bench_enqueue", "bench_pickup", "bench_idle", "bench_batch"
CYCLE, BATCHED_CYCLE, LATENCY, PROBE = "bench_cycle", "bench_batched", "bench_latency", "probe"
PICKUP_PAUSE_MS = 20  # loadgen.py pickup's --settle-ms default
BATCH_CONCURRENCY = 4  # POST /jobs/batch requests in flight (1,000 jobs each)


# -- configuration -----------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    seconds: float  # each timed wrk run and each timed cycle
    rounds: int  # alternating wrk runs of the minimal app and ours
    warmup: float  # wrk run before each timed one, discarded
    connections: int  # wrk keep-alive connections
    pickups: int  # idle long-poll pickups timed
    workers: int  # concurrent workers of the max_jobs=1 cycle
    batch_workers: int  # concurrent workers of the batched cycle
    lease_batch: int  # max_jobs of the batched cycle
    cycle_backlog: int  # jobs prefilled for the max_jobs=1 cycle
    batch_backlog: int  # jobs prefilled for the batched cycle
    idle_polls: int  # parked long polls of the idle row
    cpu_window: float  # seconds over which the server's CPU is read with the polls parked
    big: int  # the big backlog
    small: int  # the small backlog it is compared with
    latency_cycles: int  # lease+ack round trips timed at each backlog


FULL = Config(
    seconds=10, rounds=2, warmup=2, connections=64, pickups=300, workers=16, batch_workers=4,
    lease_batch=100, cycle_backlog=60_000, batch_backlog=400_000, idle_polls=1000,
    cpu_window=12, big=1_000_000, small=1000, latency_cycles=1000,
)  # fmt: skip
QUICK = dataclasses.replace(
    FULL, seconds=4, rounds=1, warmup=1, pickups=100, cycle_backlog=30_000,
    batch_backlog=100_000, cpu_window=10, big=100_000, latency_cycles=300,
)  # fmt: skip
HELP = {
    "seconds": "length of each timed wrk run and cycle",
    "rounds": "alternating wrk runs of the minimal app and ours, in the first row",
    "warmup": "wrk warm-up before each timed run, discarded",
    "connections": "wrk keep-alive connections",
    "pickups": "idle long-poll pickups timed",
    "workers": "concurrent aiohttp workers of the max_jobs=1 cycle",
    "batch_workers": "concurrent aiohttp workers of the batched cycle",
    "lease_batch": "max_jobs of the batched cycle (above 100 needs a server that allows it)",
    "cycle_backlog": "jobs prefilled for the max_jobs=1 cycle",
    "batch_backlog": "jobs prefilled for the batched cycle",
    "idle_polls": "long polls parked on an empty queue in the idle row",
    "cpu_window": "seconds over which the server's CPU is read with the polls parked (>= 10)",
    "big": "the big backlog",
    "small": "the small backlog the big one is compared with",
    "latency_cycles": "lease+ack round trips timed at each backlog",
}


@dataclass(frozen=True, slots=True)
class Targets:
    """The targets; three are lower on PostgreSQL, where every commit is an fsync."""

    enqueue_ratio: float
    batched_cycle: float
    batch_enqueue: float
    pickup_p50_ms: float = 2
    pickup_p99_ms: float = 10
    cycle: float = 1000
    idle_cpu: float = 0.05
    idle_ratio: float = 0.9
    backlog_ratio: float = 1.5
    rss_mib: float = 150
    limit_ratio: float = 1.5  # issue 10: a concurrency limit's cost to lease+ack


TARGETS = {"sqlite": Targets(0.8, 10_000, 50_000), "postgres": Targets(0.5, 5_000, 25_000)}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Flags override the chosen preset one count at a time."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--backend", choices=("sqlite", "postgres"), default="sqlite", help="default sqlite"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    parser.add_argument(
        "--pg-core",
        type=int,
        choices=(0, 1),
        default=0,
        help="core PostgreSQL is pinned to: 0 shares the server's (default), 1 the generators'",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before starting, wait up to this long until other processes use at most 10%% of "
        "the machine (default 0: start at once)",
    )
    parser.add_argument(
        "--steps",
        type=lambda text: {int(step) for step in text.split(",")},
        default=None,
        metavar="N[,N...]",
        help="run only these steps (e.g. 4); the others' rows say 'not run' (default: all)",
    )
    for name, text in HELP.items():
        kind = type(getattr(FULL, name))
        defaults = f"default {getattr(FULL, name)}, --quick {getattr(QUICK, name)}"
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} ({defaults})")
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else FULL)
    for name in HELP:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return args, config


# -- servers -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def access_log_switch() -> tuple[list[str], dict[str, str], str]:
    """How to turn the server's access log off, read from app/cli.py and app/settings.py as
    they are now (they are changing): a `--no-access-log` flag, a `BGJOBS_ACCESS_LOG`
    setting, or neither, in which case log level warning silences uvicorn's access logger,
    whose lines are INFO."""
    help_text = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    flags = ["--no-access-log"] if "--no-access-log" in help_text else []
    settings = (REPO_ROOT / "app" / "settings.py").read_text()
    has_setting = re.search(r"^\s+access_log\s*:", settings, re.MULTILINE)
    env = {"BGJOBS_ACCESS_LOG": "false"} if has_setting else {}
    used = [*flags, *(f"{k}={v}" for k, v in env.items())]
    how = " and ".join(used) if used else "no switch in app/cli.py yet; BGJOBS_LOG_LEVEL=warning"
    return flags, env, f"access log off via {how}"


# The caller's other BGJOBS_* settings reach the server (and are printed), these do not: the
# bench talks to an open server on a database and port of its own.
NOT_PASSED = {
    "BGJOBS_API_TOKENS",
    "BGJOBS_API_TOKENS_FILE",
    "BGJOBS_DATABASE_URL",
    "BGJOBS_HOST",
    "BGJOBS_PORT",
}


class Launcher:
    """Starts the real server and the minimal app the same way: pinned, quiet, logged to a
    file (a pipe nobody reads could fill and stall a server mid-measurement)."""

    def __init__(self, children: Children, workdir: Path, core: int, max_polls: int) -> None:
        self.children, self.workdir, self.core, self.max_polls = children, workdir, core, max_polls
        self.flags, extra_env, self.access_log = access_log_switch()
        self.env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
        self.passed = sorted(f"{k}={v}" for k, v in self.env.items() if k.startswith("BGJOBS_"))
        self.env |= {"BGJOBS_LOG_LEVEL": "warning", "BGJOBS_MAX_WAITING_POLLS": str(max_polls)}
        self.env |= extra_env

    def describe(self) -> str:
        return (
            f"server: python -m app.cli serve, BGJOBS_LOG_LEVEL=warning, "
            f"BGJOBS_MAX_WAITING_POLLS={self.max_polls}, {self.access_log}; from the caller's "
            f"environment: {', '.join(self.passed) or 'no BGJOBS_* setting'}"
        )

    @contextlib.contextmanager
    def _running(self, command: list[str], port: int, tag: str) -> Iterator[Server]:
        log = self.workdir / f"{tag}.log"
        with open(log, "ab") as out:
            process = self.children.spawn(pinned(self.core, command), env=self.env, stderr=out)
        try:
            server = Server(process, f"http://127.0.0.1:{port}", log)
            wait_ready(process, server.url, log)
            yield server
            if process.poll() is not None:
                raise BenchError(f"{tag} server died:\n{log.read_text()[-2000:]}")
        finally:
            self.children.stop(process)

    def ours(self, database_url: str, tag: str) -> contextlib.AbstractContextManager[Server]:
        port = free_port()
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
        return self._running([*command, "--database-url", database_url, *self.flags], port, tag)

    def minimal(self) -> contextlib.AbstractContextManager[Server]:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR), "minimal_app:app"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
        command += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        return self._running(command, port, "minimal")


# -- load generators ---------------------------------------------------------------------------


@dataclass(slots=True)
class Wrk:
    rate: float  # requests per second
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu: float  # wrk's share of its core
    others: float  # other processes' share of the whole machine meanwhile


@dataclass(slots=True)
class Caps:
    """Which of the endpoints being added exist: None, or why a row cannot run."""

    batch_enqueue: str | None
    batch_ack: str | None
    big_lease: str | None


@dataclass(slots=True)
class Bench:
    config: Config
    targets: Targets
    children: Children
    launcher: Launcher
    backend: SqliteBackend | PostgresBackend
    rows: dict[str, Row]
    client_core: int
    workdir: Path
    caps: Caps | None = None

    def postgres_pid(self) -> int | None:
        return self.backend.postmaster_pid() if isinstance(self.backend, PostgresBackend) else None


def ours_cpu(bench: Bench) -> float:
    """CPU used so far by this run: the script, its ended children, its live ones and the
    PostgreSQL server it started."""
    total = own_cpu_seconds()
    for process in bench.children.live():
        with contextlib.suppress(OSError):
            total += cpu_seconds(process.pid)
    postgres = bench.postgres_pid()
    return total + (tree_cpu_seconds(postgres) if postgres else 0.0)


def others_meter(bench: Bench) -> Callable[[], float]:
    """Starts counting the CPU that processes not of this run use (another engineer's tests,
    say); the function returned gives their share of the whole machine since then. They
    compete with the server for its core, so a figure taken while they ran is low."""
    busy, ours, start = busy_cpu_seconds(), ours_cpu(bench), time.perf_counter()

    def share() -> float:
        used = busy_cpu_seconds() - busy - (ours_cpu(bench) - ours)
        return max(used, 0.0) / ((time.perf_counter() - start) * (os.cpu_count() or 1))

    return share


def run_wrk(bench: Bench, url: str, name: str, seconds: float) -> Wrk:
    """wrk -t1 on core 1, POST /jobs; its CPU comes from the kernel's rusage of the process."""
    script = str(BENCH_DIR / "post.lua")
    command = ["wrk", "-t1", f"-c{bench.config.connections}", f"-d{seconds:g}s", "--timeout", "10s"]
    env = {**os.environ, "BENCH_JOB_NAME": name, "BENCH_PAYLOAD": PAYLOAD}
    others, start = others_meter(bench), time.perf_counter()
    process = bench.children.spawn(
        pinned(bench.client_core, [*command, "-s", script, f"{url}/jobs"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    with process.stdout:
        output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    bench.children.stop(process)
    lines = [line for line in output.splitlines() if line.startswith('{"requests"')]
    if process.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({process.returncode}):\n{output}")
    summary = json.loads(lines[-1])
    failed = sum(summary[key] for key in ("connect", "read", "write", "status", "timeout"))
    if failed:
        raise BenchError(f"wrk: {failed} of {summary['requests']} requests failed: {summary}")
    return Wrk(
        rate=summary["requests"] / (summary["duration_us"] / 1e6),
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        cpu=(usage.ru_utime + usage.ru_stime) / wall,
        others=others(),
    )


def loadgen_command(bench: Bench, mode: str, *args: object) -> list[str]:
    script = str(BENCH_DIR / "loadgen.py")
    return pinned(bench.client_core, [sys.executable, script, mode, *map(str, args)])


def run_loadgen(bench: Bench, mode: str, *args: object, timeout: float = 900) -> dict[str, Any]:
    """One aiohttp generator process on core 1; its JSON result, or BenchError if requests
    failed (the row is then reported FAILED)."""
    log, others = bench.workdir / f"loadgen-{mode}.log", others_meter(bench)
    with open(log, "ab") as err:
        process = bench.children.spawn(
            loadgen_command(bench, mode, *args), stdout=subprocess.PIPE, stderr=err
        )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"loadgen {mode} still running after {timeout:.0f} s") from exc
    finally:
        bench.children.stop(process)
    if process.returncode != 0 or not output.strip():
        raise BenchError(f"loadgen {mode} exited {process.returncode}:\n{log.read_text()[-3000:]}")
    result: dict[str, Any] = json.loads(output.splitlines()[-1])
    result["others"] = others()
    if result.get("errors"):
        raise BenchError(
            f"loadgen {mode}: {result['errors']} errors, first: {result['first_error']}"
        )
    return result


def read_json_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    if not line:
        raise BenchError(f"generator said nothing in {timeout:.0f} s (exit {process.poll()})")
    result: dict[str, Any] = json.loads(line)
    return result


def probe(url: str) -> Caps:
    """Ask the server which of the new endpoints it has: 404/405/422 mean not yet."""

    def missing(reply_status: int, ok: int, what: str) -> str | None:
        if reply_status == ok:
            return None
        if reply_status >= 500:
            raise BenchError(f"probe {what}: {reply_status}")
        return f"endpoint missing: {what} -> {reply_status}"

    jobs = {"jobs": [{"name": PROBE, "payload": PAYLOAD}]}
    ack = {"ids": ["0" * 32 + ".1"]}
    lease = {"worker_id": "probe", "names": [f"{PROBE}_empty"], "max_jobs": 1000, "wait_ms": 0}
    return Caps(
        batch_enqueue=missing(
            http("POST", f"{url}/jobs/batch", jobs).status, 201, "POST /jobs/batch"
        ),
        batch_ack=missing(http("POST", f"{url}/leases/ack", ack).status, 200, "POST /leases/ack"),
        big_lease=missing(http("POST", f"{url}/leases", lease).status, 200, "max_jobs=1000"),
    )


def others_text(share: float) -> str:
    return f"other processes {share:.0%} of the machine"


def cpu_share(result: dict[str, Any]) -> float:
    return float(result["cpu"]) / max(float(result["seconds"]), 1e-9)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: a value that was observed."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


# -- backlogs ----------------------------------------------------------------------------------


def http_fill(bench: Bench, server: Server, name: str, count: int) -> dict[str, Any]:
    result = run_loadgen(
        bench, "fill", "--url", server.url, "--name", name, "--count", count,
        "--concurrency", BATCH_CONCURRENCY,
    )  # fmt: skip
    if result.get("missing"):
        raise BenchError(f"POST /jobs/batch vanished: {result['missing']}")
    rate = f", {result['jobs'] / result['seconds']:,.0f} jobs/s" if result["jobs"] else ""
    print(f"  prefilled {result['total']:,} {name} jobs by POST /jobs/batch{rate}", flush=True)
    return result


@contextlib.contextmanager
def prepared(bench: Bench, tag: str, fills: dict[str, int]) -> Iterator[Server]:
    """A server on a fresh database holding `fills` available jobs per name: enqueued over
    HTTP with POST /jobs/batch when the server has it, else inserted by SQL while no server
    runs (one start first creates the schema)."""
    assert bench.caps is not None
    url = bench.backend.new_database(tag)
    by_sql = bool(fills) and bench.caps.batch_enqueue is not None
    if by_sql:
        with bench.launcher.ours(url, f"{tag}-schema"):
            pass
        for name, count in fills.items():
            started = time.perf_counter()
            bench.backend.insert_jobs(url, name, count)
            took = time.perf_counter() - started
            print(f"  prefilled {count:,} {name} jobs by SQL in {took:.1f} s (no /jobs/batch)")
    with bench.launcher.ours(url, tag) as server:
        if not by_sql:
            for name, count in fills.items():
                http_fill(bench, server, name, count)
        if fills:
            print(f"  after the prefill: {bench.backend.settle()}", flush=True)
        yield server


# -- the rows ----------------------------------------------------------------------------------


def make_rows(report: Report, t: Targets, cfg: Config) -> dict[str, Row]:
    """Every row of the table, in its order, before anything runs: a row that is never
    reached still shows up, as 'not run'."""
    polls = f"{cfg.idle_polls:,} idle long polls"
    return {
        "enqueue": report.row(
            f"POST /jobs, {cfg.connections} conns (wrk), / minimal FastAPI",
            f">= {t.enqueue_ratio}x",
        ),
        "pickup_p50": report.row("idle long-poll pickup p50", f"< {t.pickup_p50_ms:g} ms"),
        "pickup_p99": report.row("idle long-poll pickup p99", f"< {t.pickup_p99_ms:g} ms"),
        "cycle": report.row("cycle: lease max_jobs=1 + ack each", f">= {t.cycle:,.0f} jobs/s"),
        "batched": report.row(
            f"batched cycle: lease {cfg.lease_batch} + one batch ack",
            f">= {t.batched_cycle:,.0f} jobs/s",
        ),
        "batch_enqueue": report.row(
            "batch enqueue POST /jobs/batch (1000/req)", f">= {t.batch_enqueue:,.0f} jobs/s"
        ),
        "idle_cpu": report.row(f"{polls}: server CPU", f"< {t.idle_cpu:.0%} of a core"),
        "idle_rate": report.row(f"{polls}: POST /jobs with/without", f">= {t.idle_ratio}x"),
        "backlog": report.row(
            f"{cfg.big:,} backlog: lease+ack p50 / {cfg.small:,}", f"<= {t.backlog_ratio}x"
        ),
        "rss": report.row(f"{cfg.big:,} backlog: server VmHWM", f"< {t.rss_mib:g} MiB"),
        "limit": report.row(
            f"{cfg.big:,} backlog: lease+ack p50, concurrency limit / none",
            f"< {t.limit_ratio}x",
        ),
    }


def section(rows: list[Row], body: Callable[[], None]) -> None:
    """A break in one section fails its rows that have no figure yet; the others still run."""
    try:
        body()
    except BenchError as exc:
        for row in rows:
            if row.figure == "not run":
                row.failed(str(exc))


def combined(runs: list[Wrk]) -> Wrk:
    """Several wrk runs as one: all their requests over all their time."""
    requests, seconds = sum(r.requests for r in runs), sum(r.seconds for r in runs)
    return Wrk(
        rate=requests / seconds,
        requests=requests,
        seconds=seconds,
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=max(r.p99_ms for r in runs),
        cpu=max(r.cpu for r in runs),
        others=max(r.others for r in runs),
    )


def enqueue_row(bench: Bench, server: Server, minimal: Server) -> None:
    """The minimal app and ours in alternating rounds of the same wrk command, so that a
    change of load on the machine during the run falls on both."""
    row, cfg = bench.rows["enqueue"], bench.config
    for url in (minimal.url, server.url):
        run_wrk(bench, url, ENQUEUE, cfg.warmup)
    theirs, ours = [], []
    for _ in range(cfg.rounds):
        theirs.append(run_wrk(bench, minimal.url, ENQUEUE, cfg.seconds))
        ours.append(run_wrk(bench, server.url, ENQUEUE, cfg.seconds))
    base, mine = combined(theirs), combined(ours)
    if not base.requests:
        raise BenchError("the minimal app answered no request")
    ratio = mine.rate / base.rate
    row.measured(f"{ratio:.2f}x", ratio, bench.targets.enqueue_ratio, higher_is_better=True)
    for label, w in (("ours", mine), ("minimal", base)):
        row.note(
            f"{label}: {w.rate:,.0f} req/s, p50 {w.p50_ms:.1f} ms, p99 {w.p99_ms:.1f} ms "
            f"(wrk at {w.cpu:.0%} of core 1; {others_text(w.others)})"
        )
        row.void_if_busy(w.cpu, f"wrk against {label}")
    row.note(f"{cfg.rounds} round(s) of {cfg.seconds:g} s each, alternating minimal and ours")
    row.note(f"HTTP stack, from /proc/PID/maps: ours {stack(server)}, minimal {stack(minimal)}")


def stack(server: Server) -> str:
    """Which of uvloop and httptools the server process has loaded: the minimal app is given
    them explicitly, ours gets them from uvicorn's `auto` defaults."""
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    found = [name for name in ("uvloop", "httptools") if f"/{name}/" in maps]
    return " + ".join(found) or "asyncio + h11"


def pickup_rows(bench: Bench, server: Server, minimal: Server) -> None:
    """Pickup latency, and beside it the minimal app's round trip after the same idle
    pause: on a VM a sleeping core takes a while to wake, and no server beats that. The
    rows before leave the disk busy writing back; idle means after that."""
    settled = settle_disk()
    result = run_loadgen(
        bench, "pickup", "--url", server.url, "--name", PICKUP, "--samples",
        bench.config.pickups, "--yardstick", minimal.url,
    )  # fmt: skip
    latencies, t = result["latencies_ms"], bench.targets
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    bench.rows["pickup_p50"].measured(f"{p50:.2f} ms", p50, t.pickup_p50_ms, False)
    bench.rows["pickup_p99"].measured(f"{p99:.2f} ms", p99, t.pickup_p99_ms, False)
    bench.rows["pickup_p99"].note(
        f"{len(latencies)} samples, max {max(latencies):.2f} ms; the enqueue round trip "
        f"alone p50 {percentile(result['enqueue_ms'], 50):.2f} ms (a job is leasable only once "
        f"committed); generator at {cpu_share(result):.0%} of core 1; "
        f"{others_text(result['others'])}"
    )
    bench.rows["pickup_p99"].note(f"disk idle before: {settled}")
    idle_rtt = result["yardstick_ms"]
    bench.rows["pickup_p99"].note(
        f"yardstick: the minimal app's POST after the same {PICKUP_PAUSE_MS} ms idle pause, "
        f"p50 {percentile(idle_rtt, 50):.2f} ms, p99 {percentile(idle_rtt, 99):.2f} ms "
        f"(back to back it is far less: the pause lets this VM's cores sleep)"
    )
    bench.rows["pickup_p50"].void_if_busy(cpu_share(result))


def idle_rows(bench: Bench, server: Server) -> None:
    """POST /jobs rate without, then with, `idle_polls` long polls parked on another name;
    in between, the server's CPU over `cpu_window` seconds with only the polls open."""
    cfg, cpu_row, rate_row = bench.config, bench.rows["idle_cpu"], bench.rows["idle_rate"]
    without = run_wrk(bench, server.url, ENQUEUE, cfg.seconds)
    log = bench.workdir / "loadgen-idle.log"
    command = loadgen_command(bench, "idle", "--url", server.url, "--name", IDLE)
    with open(log, "ab") as err:
        polls = bench.children.spawn(
            [*command, "--polls", str(cfg.idle_polls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        parked = read_json_line(polls, timeout=120)
        if parked["open"] != cfg.idle_polls or parked["errors"]:
            raise BenchError(f"not all polls parked: {parked}")
        postgres = bench.postgres_pid()
        pg_before = tree_cpu_seconds(postgres) if postgres else 0.0
        before, start, others = cpu_seconds(server.pid), time.perf_counter(), others_meter(bench)
        time.sleep(cfg.cpu_window)
        cpu = (cpu_seconds(server.pid) - before) / (time.perf_counter() - start)
        others_share = others()
        pg_cpu = (tree_cpu_seconds(postgres) - pg_before) / cfg.cpu_window if postgres else None
        with_polls = run_wrk(bench, server.url, ENQUEUE, cfg.seconds)
        assert polls.stdin is not None
        polls.stdin.write(b"stop\n")
        polls.stdin.flush()
        done = read_json_line(polls, timeout=120)
    finally:
        bench.children.stop(polls)
    if done["open_at_stop"] != cfg.idle_polls:
        raise BenchError(f"long polls ended before they were let go: {done}")
    cpu_row.measured(f"{cpu:.1%} of a core", cpu, bench.targets.idle_cpu, False)
    cpu_row.note(
        f"{cfg.idle_polls} polls (wait_ms=60000) parked on '{IDLE}'; /proc/{server.pid}/stat "
        f"over {cfg.cpu_window:g} s; generator at {done['cpu'] / done['seconds']:.0%} of core 1; "
        f"{others_text(others_share)}"
    )
    if pg_cpu is not None:
        cpu_row.note(f"PostgreSQL's processes meanwhile: {pg_cpu:.1%} of a core")
    ratio = with_polls.rate / without.rate
    rate_row.measured(f"{ratio:.2f}x", ratio, bench.targets.idle_ratio, True)
    rate_row.note(
        f"{with_polls.rate:,.0f} req/s with the polls open, {without.rate:,.0f} without "
        f"(wrk at {with_polls.cpu:.0%} / {without.cpu:.0%} of core 1; other processes "
        f"{with_polls.others:.0%} / {without.others:.0%} of the machine)"
    )
    rate_row.void_if_busy(max(with_polls.cpu, without.cpu), "wrk")


def batch_enqueue_row(bench: Bench, server: Server) -> None:
    row = bench.rows["batch_enqueue"]
    assert bench.caps is not None
    if bench.caps.batch_enqueue:
        row.unavailable(bench.caps.batch_enqueue)
        return
    result = run_loadgen(
        bench, "fill", "--url", server.url, "--name", BATCH, "--count", 10**9,
        "--concurrency", BATCH_CONCURRENCY, "--seconds", bench.config.seconds,
    )  # fmt: skip
    if result.get("missing"):
        row.unavailable(f"endpoint missing: POST /jobs/batch -> {result['missing']}")
        return
    rate = result["jobs"] / result["seconds"]
    row.measured(f"{rate:,.0f} jobs/s", rate, bench.targets.batch_enqueue, True)
    row.note(
        f"{result['jobs']:,} jobs in {result['seconds']:.1f} s, {BATCH_CONCURRENCY} requests "
        f"of 1,000 jobs in flight; generator at {cpu_share(result):.0%} of core 1; "
        f"{others_text(result['others'])}"
    )
    row.void_if_busy(cpu_share(result))


def main_server_rows(bench: Bench) -> None:
    """One server for the rows that need no backlog; the minimal app runs beside it for the
    first row only."""
    rows = bench.rows

    def against_minimal() -> None:
        with bench.launcher.minimal() as minimal:
            section([rows["enqueue"]], lambda: enqueue_row(bench, server, minimal))
            section(
                [rows["pickup_p50"], rows["pickup_p99"]],
                lambda: pickup_rows(bench, server, minimal),
            )

    with bench.launcher.ours(bench.backend.new_database("main"), "main") as server:
        bench.caps = probe(server.url)
        section([rows["enqueue"], rows["pickup_p50"], rows["pickup_p99"]], against_minimal)
        section([rows["idle_cpu"], rows["idle_rate"]], lambda: idle_rows(bench, server))
        section([rows["batch_enqueue"]], lambda: batch_enqueue_row(bench, server))


def cycle_row(bench: Bench, server: Server, row: Row, name: str, batched: bool) -> None:
    cfg = bench.config
    workers, max_jobs = (cfg.batch_workers, cfg.lease_batch) if batched else (cfg.workers, 1)
    args: list[object] = ["--url", server.url, "--name", name, "--workers", workers]
    args += ["--max-jobs", max_jobs, "--seconds", cfg.seconds]
    result = run_loadgen(bench, "cycle", *args, *(["--batch-ack"] if batched else []))
    rate = result["jobs"] / result["seconds"]
    target = bench.targets.batched_cycle if batched else bench.targets.cycle
    row.measured(f"{rate:,.0f} jobs/s", rate, target, True)
    how = "one POST /leases/ack per lease" if batched else "POST /leases/{id}/ack per job"
    drained = ", backlog drained before the time was up" if result["drained"] else ""
    row.note(
        f"{workers} workers, max_jobs={max_jobs}, {how}: {result['jobs']:,} jobs in "
        f"{result['seconds']:.1f} s{drained}; generator at {cpu_share(result):.0%} of core 1; "
        f"{others_text(result['others'])}"
    )
    row.void_if_busy(cpu_share(result))


def cycle_rows(bench: Bench) -> None:
    if bench.caps is None:
        raise BenchError("the first section never reached the server")
    cfg, caps, rows = bench.config, bench.caps, bench.rows
    why_not = caps.batch_ack or (caps.big_lease if cfg.lease_batch > 100 else None)
    fills = {CYCLE: cfg.cycle_backlog} | ({} if why_not else {BATCHED_CYCLE: cfg.batch_backlog})
    with prepared(bench, "cycles", fills) as server:
        section([rows["cycle"]], lambda: cycle_row(bench, server, rows["cycle"], CYCLE, False))
        if why_not:
            rows["batched"].unavailable(why_not)
        else:
            section(
                [rows["batched"]],
                lambda: cycle_row(bench, server, rows["batched"], BATCHED_CYCLE, True),
            )


def alternating_latency(
    bench: Bench, first: Server, second: Server
) -> tuple[list[float], list[float], dict[str, Any]]:
    """Lease+ack latencies (ms) on two servers, one worker alternating between them in
    blocks; and the generator's whole result."""
    result = run_loadgen(
        bench, "latency", "--url", first.url, "--url", second.url, "--name", LATENCY,
        "--cycles", bench.config.latency_cycles,
    )  # fmt: skip
    latencies = result["latencies_ms"]
    return latencies[first.url], latencies[second.url], result


def latency_text(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):.2f} ms, "
        f"p99 {percentile(values, 99):.2f} ms ({len(values)} lease+ack, 1 worker)"
    )


def backlog_rows(bench: Bench) -> None:
    """Lease+ack latency at `big` and `small` backlogs, one worker alternating between two
    servers; and the big server's peak RSS once its backlog was enqueued over HTTP."""
    if bench.caps is None:
        raise BenchError("the first section never reached the server")
    cfg, lat_row, rss_row = bench.config, bench.rows["backlog"], bench.rows["rss"]
    if cfg.big != 1_000_000:
        rss_row.note(f"backlog of {cfg.big:,} jobs, not 1,000,000 (--quick or --big)")
    with (
        prepared(bench, "small", {LATENCY: cfg.small}) as small,
        prepared(bench, "big", {LATENCY: cfg.big}) as big,
    ):
        if bench.caps.batch_enqueue:
            rss_row.unavailable("no /jobs/batch")
        else:
            peak = status_kib(big.pid, "VmHWM") / 1024
            rss_row.measured(f"{peak:.0f} MiB", peak, bench.targets.rss_mib, False)
            baseline = status_kib(small.pid, "VmHWM") / 1024
            rss_row.note(f"a server with {cfg.small:,} jobs: VmHWM {baseline:.0f} MiB")
        at_big, at_small, result = alternating_latency(bench, big, small)
    ratio = statistics.median(at_big) / statistics.median(at_small)
    lat_row.measured(f"{ratio:.2f}x", ratio, bench.targets.backlog_ratio, False, strict=False)
    for size, values in ((cfg.big, at_big), (cfg.small, at_small)):
        lat_row.note(f"at {size:,} jobs: {latency_text(values)}")
    lat_row.note(
        f"alternating blocks of 50 between the two; generator at {cpu_share(result):.0%} of "
        f"core 1; {others_text(result['others'])}"
    )
    lat_row.void_if_busy(cpu_share(result))


def set_limit(url: str, name: str, limit: int) -> None:
    """PATCH /queues/{name} with a concurrency limit (no token: the bench runs open)."""
    body = json.dumps({"concurrency_limit": limit}).encode()
    request = urllib.request.Request(
        f"{url}/queues/{name}", body, {"Content-Type": "application/json"}, method="PATCH"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise BenchError(f"PATCH /queues/{name}: {response.status}")


def limit_rows(bench: Bench) -> None:
    """Lease+ack latency at the big backlog with a concurrency limit on the name (one
    that never binds: every reserve pays for the check, none is refused) against the same
    backlog without one, one worker alternating between the two servers."""
    if bench.caps is None:
        raise BenchError("the first section never reached the server")
    cfg, row = bench.config, bench.rows["limit"]
    with (
        prepared(bench, "free", {LATENCY: cfg.big}) as free,
        prepared(bench, "limited", {LATENCY: cfg.big}) as limited,
    ):
        set_limit(limited.url, LATENCY, 1000)
        at_limited, at_free, result = alternating_latency(bench, limited, free)
    ratio = statistics.median(at_limited) / statistics.median(at_free)
    row.measured(f"{ratio:.2f}x", ratio, bench.targets.limit_ratio, False, strict=True)
    for what, values in (("concurrency_limit 1000", at_limited), ("no limit", at_free)):
        row.note(f"{what}, {cfg.big:,} jobs: {latency_text(values)}")
    row.void_if_busy(cpu_share(result))


STEPS: tuple[tuple[str, Callable[[Bench], None], tuple[str, ...]], ...] = (
    (
        "1. POST /jobs vs the minimal app, pickup, idle polls, batch enqueue",
        main_server_rows,
        ("enqueue", "pickup_p50", "pickup_p99", "idle_cpu", "idle_rate", "batch_enqueue"),
    ),
    ("2. lease+ack cycles from a prefilled backlog", cycle_rows, ("cycle", "batched")),
    ("3. big backlog: latency and memory", backlog_rows, ("backlog", "rss")),
    ("4. big backlog: the cost of a concurrency limit", limit_rows, ("limit",)),
)


# -- main --------------------------------------------------------------------------------------


def foreign_load(cpu_seconds: float, wall: float) -> str:
    """Other processes compete with the server for its core: say how much they ran."""
    share = cpu_seconds / wall / (os.cpu_count() or 1)
    text = (
        f"other processes on the machine during the run: {max(cpu_seconds, 0):.0f} CPU seconds "
        f"in {wall:.0f} s ({max(share, 0):.0%} of all cores; this run's children excluded)"
    )
    if share > 0.05:
        text += ": WARNING, the machine was not quiet; figures are lower than on a quiet one"
    return text


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run like Ctrl-C: every `finally` runs and every child is stopped."""
    raise KeyboardInterrupt


def open_backend(
    name: str, workdir: Path, parent: Path, core: int
) -> SqliteBackend | PostgresBackend:
    if name == "sqlite":
        return SqliteBackend(workdir)
    backend = PostgresBackend(parent, core)
    try:
        backend.start()
    except BaseException:
        backend.close()
        raise
    return backend


def postgres_pinning(backend: PostgresBackend, server_core: int) -> str:
    """Read back from the kernel, not assumed from the taskset command."""
    allowed = status_line(backend.postmaster_pid(), "Cpus_allowed_list")
    shares = "the server's" if allowed == str(server_core) else "the generators'"
    return (
        f"PostgreSQL pinned to core {allowed}: it shares {shares} core; "
        f"database folder: {describe_disk(backend.root)}"
    )


def context_lines(
    args: argparse.Namespace, config: Config, cores: tuple[int, int], workdir: Path
) -> list[str]:
    server, client = cores
    lines = [
        f"machine: {describe_machine()}",
        f"code under test: {code_under_test()}",
        f"load average at start: {load_average()}",
        f"pinning: server on core {server}; wrk, aiohttp generators and this script on core "
        f"{client}",
        f"database folder: {describe_disk(workdir)}",
        f"mode: {'--quick' if args.quick else 'full'}, backend {args.backend}; {config}",
    ]
    if server == client:
        lines.append("WARNING: one core only: server and generators share it")
    return lines


def run(args: argparse.Namespace, config: Config, report: Report, children: Children) -> None:
    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = cores[0], cores[1] if len(cores) > 1 else cores[0]
    os.sched_setaffinity(0, {client_core})
    if args.wait_quiet > 0:
        report.context.append(wait_for_quiet(args.wait_quiet))
    started = time.perf_counter()
    parent = workdir_parent()
    workdir = Path(tempfile.mkdtemp(prefix="bgjobs-bench-", dir=parent))
    backend: SqliteBackend | PostgresBackend | None = None
    busy, own, postgres_cpu = busy_cpu_seconds(), own_cpu_seconds(), 0.0
    try:
        report.context += context_lines(args, config, (server_core, client_core), workdir)
        pg_core = server_core if args.pg_core == 0 else client_core
        backend = open_backend(args.backend, workdir, parent, pg_core)
        report.context += backend.describe()
        if isinstance(backend, PostgresBackend):
            report.context.append(postgres_pinning(backend, server_core))
        launcher = Launcher(children, workdir, server_core, max(2000, 2 * config.idle_polls))
        report.context.append(launcher.describe())
        for line in report.context:
            print(line, flush=True)
        bench = Bench(
            config, TARGETS[args.backend], children, launcher, backend, {}, client_core, workdir
        )
        bench.rows = make_rows(report, bench.targets, config)
        if args.steps and 1 not in args.steps:  # what the server can do, from a bare one
            with launcher.ours(backend.new_database("probe"), "probe") as server:
                bench.caps = probe(server.url)
        for number, (title, step, keys) in enumerate(STEPS, start=1):
            if args.steps and number not in args.steps:
                continue
            print(f"\n{title}", flush=True)
            section([bench.rows[key] for key in keys], functools.partial(step, bench))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        children.stop_all()
        if isinstance(backend, PostgresBackend) and backend.running():
            postgres_cpu = tree_cpu_seconds(backend.postmaster_pid())
        if backend is not None:
            backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
        others = busy_cpu_seconds() - busy - (own_cpu_seconds() - own) - postgres_cpu
        report.context.append(foreign_load(others, time.perf_counter() - started))
        report.context.append(f"load average at end: {load_average()}")
        report.context.append(f"wall time: {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    report, children, status = Report(), Children(), 0
    try:
        run(args, config, report, children)
    except KeyboardInterrupt:
        print("\nbench: interrupted; every child was stopped", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        status = 1
    report.print()
    return status or (1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
