"""Where the benchmark's databases live: SQLite files, or a throwaway PostgreSQL server.

Both backends hand out a fresh database per scenario and can prefill one with available
jobs by plain SQL, for when the server has no batch enqueue endpoint: raw `sqlite3` on the
file, `psql` on PostgreSQL. Prefills happen while no server runs on that database, so a
server that keeps anything in memory starts from what is on disk. The rows carry the
columns of the `jobs` table (app/storage/tables.py), with `available_at` one microsecond
apart and a day in the past, so the oldest-first order is defined and every job is due.

PostgreSQL runs with its defaults (fsync=on, synchronous_commit=on): unlike the test
suite's cluster, durability is part of what is measured.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from children import REPO_ROOT, BenchError, free_port, pinned
from loadgen import PAYLOAD
from machine import settle_disk

INSERT_COLUMNS = "id, name, payload, attempts, max_retries, created_at, available_at, lease_seq"


def job_id_prefix(name: str) -> str:
    """Ids shaped like the server's (12 hex digits of milliseconds, then 20 more), and
    distinct between the names prefilled into one database."""
    millis = time.time_ns() // 1_000_000 - 86_400_000
    return f"{millis:012x}{zlib.crc32(name.encode()) & 0xFFFF:04x}"


class SqliteBackend:
    """One SQLite file per scenario, in the benchmark's folder on the repository's disk."""

    name = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def new_database(self, tag: str) -> str:
        return f"sqlite+aiosqlite:///{self.workdir / f'{tag}.db'}"

    def insert_jobs(self, url: str, name: str, count: int) -> None:
        path = url.split(":///", 1)[1]
        with sqlite3.connect(path, timeout=30) as conn:
            for chunk in chunks(sqlite_rows(name, count), 50_000):
                conn.executemany(
                    f"INSERT INTO jobs ({INSERT_COLUMNS}) VALUES (?, ?, ?, 0, 3, ?, ?, 0)", chunk
                )
                conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def describe(self) -> list[str]:
        settings = (REPO_ROOT / "app" / "settings.py").read_text()
        found = re.search(r"sqlite_synchronous\b.*=\s*\"(\w+)\"", settings)
        synchronous = os.environ.get("BGJOBS_SQLITE_SYNCHRONOUS") or (
            f"{found.group(1)} (the default in app/settings.py)" if found else "the default"
        )
        return [f"SQLite {sqlite3.sqlite_version}, synchronous={synchronous}, in {self.workdir}"]

    def settle(self) -> str:
        """Write back what a prefill left dirty, so a timed row does not pay for it."""
        return settle_disk()

    def close(self) -> None:
        pass


def sqlite_rows(name: str, count: int) -> Iterator[tuple[str, str, str, str, str]]:
    """Timestamps as the server stores them in SQLite: naive UTC text of fixed width."""
    prefix, base = job_id_prefix(name), datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1)
    for i in range(count):
        stamp = (base + timedelta(microseconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
        yield f"{prefix}{i:016x}", name, PAYLOAD, stamp, stamp


def chunks(rows: Iterator[tuple[str, ...]], size: int) -> Iterator[list[tuple[str, ...]]]:
    chunk: list[tuple[str, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- PostgreSQL --------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """The newest installed server binaries (Debian keeps them off the PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for folder in reversed(found):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise BenchError("PostgreSQL server binaries (initdb, pg_ctl) not found")


class PostgresBackend:
    """A throwaway PostgreSQL server with default durability, pinned to one core.

    As root it runs as the `postgres` user (PostgreSQL refuses root). `pg_ctl` daemonizes
    the server, so it is stopped explicitly by `close`, never left behind by a `finally`.
    """

    name = "postgres"

    def __init__(self, parent: Path, core: int) -> None:
        self.core = core
        self.port = free_port()
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="bgjobs-bench-pg-", dir=parent))
        self.data = self.root / "data"
        self.count = 0

    def _as_postgres(self, command: Sequence[str]) -> list[str]:
        if os.geteuid() != 0:
            return list(command)
        pwd.getpwnam("postgres")  # KeyError: no user to run PostgreSQL as
        return ["runuser", "-u", "postgres", "--", *command]

    def _run(self, command: Sequence[str], timeout: float = 120) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        self._run(self._as_postgres([*initdb, "-E", "UTF8", "--locale=C.UTF-8"]))
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
        )
        pg_ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log")]
        start = [*pg_ctl, "-w", "-t", "60", "-o", options, "start"]
        # The postmaster and every backend it forks inherit the core from taskset.
        self._run(pinned(self.core, self._as_postgres(start)))

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def settle(self) -> str:
        """A CHECKPOINT, then write-back: a prefill of hundreds of thousands of jobs fills
        the WAL, and the checkpoint it forces would otherwise land in the timed row."""
        started = time.perf_counter()
        self.sql("CHECKPOINT")
        return f"CHECKPOINT in {time.perf_counter() - started:.2f} s; {settle_disk()}"

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            pg_ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate"]
            subprocess.run(self._as_postgres([*pg_ctl, "-w", "stop"]), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, database: str = "postgres") -> str:
        psql = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database]
        return self._run([*psql, "-v", "ON_ERROR_STOP=1", "-At", "-c", statement]).strip()

    def new_database(self, tag: str) -> str:
        self.count += 1
        name = f"bench_{self.count}_{tag.replace('-', '_')}"
        self.sql(f'CREATE DATABASE "{name}"')
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def insert_jobs(self, url: str, name: str, count: int) -> None:
        database = url.rsplit("/", 1)[1]
        stamp = "now() - interval '1 day' + g * interval '1 microsecond'"
        self.sql(
            f"INSERT INTO jobs ({INSERT_COLUMNS}) "
            f"SELECT '{job_id_prefix(name)}' || lpad(to_hex(g), 16, '0'), '{name}', "
            f"'{PAYLOAD}', 0, 3, {stamp}, {stamp}, 0 FROM generate_series(1, {count}) AS g; "
            "ANALYZE jobs",
            database,
        )

    def describe(self) -> list[str]:
        settings = self.sql(
            "SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync') "
            "|| ', synchronous_commit=' || current_setting('synchronous_commit') "
            "|| ', shared_buffers=' || current_setting('shared_buffers')"
        )
        return [f"PostgreSQL {settings}, data in {self.data}"]
