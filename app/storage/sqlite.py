"""The embedded default: one SQLite file in WAL mode, for one server process.

SQLite allows one writer at a time, which suits group commit: every write of the process
goes through one connection, owned by one thread, and a whole group (many requests) is
one transaction and one hop to that thread. Readers run concurrently on their own
connections (WAL), through SQLAlchemy.

The hot-path statements are written here once, as text, and prepared once by sqlite3's
statement cache. Times are stored as SQLAlchemy stores them on SQLite (naive UTC text of
fixed width, `YYYY-MM-DD HH:MM:SS.ffffff`), so both paths read each other's rows and text
order is time order.
"""

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app.queue.errors import StorageUnavailable
from app.queue.models import (
    AnyJob,
    Buried,
    Enqueued,
    EnqueuedBatch,
    FailedJob,
    FailOutcome,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    QueueChange,
    Retrying,
    SucceededJob,
)
from app.queue.ports import CancelResult, DeleteScope, FireResult
from app.queue.schedules import Firing, Schedule
from app.storage.common import (
    FAILED_COLUMNS,
    JOB_COLUMNS,
    PRUNED,
    SCHEDULE_COLUMNS,
    SCHEDULE_FIELDS,
    SUCCEEDED_COLUMNS,
    SqlStorage,
    epoch_minute,
    flag,
    handed_lease,
    job_from,
    leases_from,
    new_job,
    per_minute,
    prune_bound,
    queue_upsert,
)
from app.storage.writer import Op, Writer, runs

NO_LIMIT = 1 << 62
# Result codes that mean the file cannot be reached or written now (a 503): permissions,
# busy or locked, out of memory, read-only, I/O error, corrupt, disk full, cannot open,
# locking protocol, not a database. Anything else (a syntax error, a constraint) is a bug.
OUTAGE_CODES = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 26})


def is_outage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code & 0xFF in OUTAGE_CODES


@lru_cache(maxsize=4096)
def ts(moment: datetime) -> str:
    """Stored text of a time (cached: the rows of one batch or group share their times)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


@lru_cache(maxsize=4096)
def dt(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _dt_or_none(text: str | None) -> datetime | None:
    return None if text is None else dt(text)


def _ts_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else ts(moment)


# Where the times are in rows of JOB_COLUMNS, SUCCEEDED_COLUMNS and FAILED_COLUMNS.
JOB_TIMES = (5, 6, 7, 9, 12)
SUCCEEDED_TIMES = (4, 5, 6, 9)
FAILED_TIMES = (5, 6, 7, 10)


def _times(row: sqlite3.Row | tuple[Any, ...], *at: int) -> list[Any]:
    """The row with the columns at `at` turned from stored text into aware datetimes."""
    values = list(row)
    for i in at:
        if values[i] is not None:
            values[i] = dt(values[i])
    return values


# -- statements ---------------------------------------------------------------------------

INSERT_PLAIN_JOB = (
    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, "
    "lease_seq, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_JOB = (
    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, "
    "lease_seq, priority, schedule_id, scheduled_for, catch_up) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A job handed straight to a waiting poll: inserted already reserved, with its first lease.
INSERT_LEASED = (
    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, "
    "lease_seq, reserved_at, reserved_by, lease_id, lease_expires_at, priority) "
    "VALUES (?, ?, ?, 1, ?, ?, ?, 1, ?, ?, ?, ?, ?)"
)
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
# A name whose jobs are never handed straight to a poll: paused, or limited (a limited
# name's leases go through the reserve statement, which checks the limits).
IS_HELD = (
    "SELECT 1 FROM queues WHERE name = ? "
    "AND (paused OR concurrency_limit IS NOT NULL OR rate_count IS NOT NULL)"
)
# The rate limit's bucket, refilled from `tokens_at` to :now at `rate_count` per
# `rate_per_ms`, holding one token at most (see common.tokens_now).
TOKENS = (
    "min(1.0, q.tokens + max(0.0, (julianday(:now) - julianday(q.tokens_at)) * 86400000.0) "
    "* q.rate_count / q.rate_per_ms)"
)
SPEND = (
    f"UPDATE queues AS q SET tokens = max(0.0, {TOKENS} - :spent), tokens_at = :now "
    "WHERE name = :name AND rate_count IS NOT NULL"
)
REFUND = "UPDATE queues SET tokens = min(1.0, tokens + 1) WHERE name = ? AND rate_count IS NOT NULL"
SELECT_SUCCEEDED = f"SELECT {SUCCEEDED_COLUMNS} FROM succeeded_jobs WHERE id = ?"
SELECT_FAILED = f"SELECT {FAILED_COLUMNS} FROM failed_jobs WHERE id = ?"
ACK = (
    "DELETE FROM jobs WHERE id = ? AND lease_id = ? RETURNING id, name, payload, attempts, "
    f"lease_seq, created_at, available_at, reserved_at, priority, {SCHEDULE_COLUMNS}"
)
INSERT_SUCCEEDED = (
    "INSERT INTO succeeded_jobs (id, name, payload, attempts, lease_seq, created_at, "
    f"available_at, succeeded_at, priority, {SCHEDULE_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
HELD = (
    "SELECT id, name, payload, attempts, max_retries, created_at, available_at, lease_seq, "
    f"reserved_at, priority, {SCHEDULE_COLUMNS} FROM jobs WHERE id = ? AND lease_id = ?"
)
HELD_EXPIRED = HELD + " AND reserved_at IS NOT NULL AND lease_expires_at <= ?"
REQUEUE = (
    "UPDATE jobs SET available_at = ?, reserved_at = NULL, reserved_by = NULL, "
    "lease_expires_at = NULL WHERE id = ?"
)
DELETE_JOB = "DELETE FROM jobs WHERE id = ?"
INSERT_FAILED = (
    "INSERT INTO failed_jobs (id, name, payload, attempts, max_retries, lease_seq, exception, "
    f"created_at, available_at, failed_at, priority, {SCHEDULE_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
EXTEND = (
    "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND lease_id = ? AND reserved_at IS NOT NULL"
)
RELEASE = (
    "UPDATE jobs SET reserved_at = NULL, reserved_by = NULL, lease_id = NULL, "
    "lease_expires_at = NULL, attempts = attempts - 1 "
    f"WHERE id = ? AND lease_id = ? AND reserved_at IS NOT NULL RETURNING {JOB_COLUMNS}"
)
CANCEL_PENDING = (
    "DELETE FROM jobs WHERE id = ? AND reserved_at IS NULL RETURNING name, available_at"
)
IS_PENDING = "SELECT 1 FROM jobs WHERE id = ?"
DELETE_FINISHED = {
    "succeeded": "DELETE FROM succeeded_jobs WHERE id = ? RETURNING name",
    "failed": "DELETE FROM failed_jobs WHERE id = ? RETURNING name",
}
TAKE_FAILED = (
    "DELETE FROM failed_jobs WHERE id = ? "
    f"RETURNING id, name, payload, max_retries, created_at, lease_seq, priority, {SCHEDULE_COLUMNS}"
)
KEY_TABLES = {False: "idempotency_keys", True: "batch_idempotency_keys"}
COUNT_FINISHED = (
    "INSERT INTO finished_per_minute (name, minute, shard, succeeded, failed) "
    "VALUES (?, ?, 0, ?, ?) ON CONFLICT (name, minute, shard) DO UPDATE SET "
    "succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed"
)
ADD_COUNTS = (
    "INSERT INTO job_counts (name, shard, pending, reserved, succeeded, failed) "
    "VALUES (?, 0, ?, ?, ?, ?) ON CONFLICT (name, shard) DO UPDATE SET "
    "pending = pending + excluded.pending, reserved = reserved + excluded.reserved, "
    "succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed"
)
ADD_DUE = (
    "INSERT INTO due_counts (name, minute, shard, jobs) VALUES (?, ?, 0, ?) "
    "ON CONFLICT (name, minute, shard) DO UPDATE SET jobs = jobs + excluded.jobs"
)


def room(i: int) -> str:
    """How many jobs of name `:n{i}` this reserve may lease: its share of :max_jobs,
    less what its settings forbid now. Paused, none; under a concurrency limit, the
    limit less its reserved jobs (`job_counts`, exact here: the writer is the only writer
    and flushes its tally first); under a rate limit, the whole tokens in its bucket. A
    name without settings has no row, hence the outer coalesce."""
    reserved = f"(SELECT reserved FROM job_counts WHERE name = :n{i} AND shard = 0)"
    return (
        "coalesce((SELECT CASE WHEN q.paused THEN 0 ELSE max(0, min(:max_jobs, "
        f"coalesce(q.concurrency_limit - coalesce({reserved}, 0), :max_jobs), "
        f"coalesce(CAST({TOKENS} AS INTEGER), :max_jobs))) END "
        f"FROM queues AS q WHERE q.name = :n{i}), :max_jobs)"
    )


@lru_cache(maxsize=128)
def reserve_sql(name_count: int) -> str:
    """One UPDATE ... WHERE id IN (oldest ready ids) RETURNING, for `name_count` names.

    Safe without row locks: the writer is the only connection that writes and it runs
    this inside BEGIN IMMEDIATE, so nothing can reserve between the sub-select and the
    update, and `reserved_at IS NULL` is re-checked on every row it changes. One bounded
    range scan of the partial index `ix_jobs_ready_priority` per name (glued with UNION
    ALL) keeps the cost independent of the backlog, where `name IN (...) ORDER BY` would
    sort it all. Each range's LIMIT is the name's `room`: settings hold in the statement.
    The running total of payload sizes stops the pick before it passes `:max_bytes` (the
    first row always goes). The index is named: without statistics SQLite prefers
    `ix_jobs_ready`'s range on available_at and sorts the name's whole ready set.
    """
    ranges = " UNION ALL ".join(
        "SELECT * FROM (SELECT id, priority, available_at, "
        "length(CAST(payload AS BLOB)) AS size "
        f"FROM jobs INDEXED BY ix_jobs_ready_priority WHERE name = :n{i} "
        "AND reserved_at IS NULL AND available_at <= :now "
        f"ORDER BY priority, available_at, id LIMIT {room(i)})"
        for i in range(name_count)
    )
    order = "priority, available_at, id"
    return (
        f"WITH candidates AS ({ranges}), "
        f"oldest AS (SELECT * FROM candidates ORDER BY {order} LIMIT :max_jobs), "
        "picked AS (SELECT id, row_number() OVER w AS n, sum(size) OVER w AS total "
        f"FROM oldest WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)) "
        "UPDATE jobs SET attempts = attempts + 1, reserved_at = :now, reserved_by = :worker, "
        "lease_seq = lease_seq + 1, lease_id = id || '.' || (lease_seq + 1), "
        "lease_expires_at = :expires "
        "WHERE id IN (SELECT id FROM picked WHERE n = 1 OR total <= :max_bytes) "
        f"AND reserved_at IS NULL RETURNING {JOB_COLUMNS}, lease_id"
    )


# -- schedules --------------------------------------------------------------------------

PUT_SCHEDULE = (
    f"INSERT INTO schedules ({SCHEDULE_FIELDS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, payload = excluded.payload, "
    "max_retries = excluded.max_retries, priority = excluded.priority, "
    "interval_ms = excluded.interval_ms, cron = excluded.cron, timezone = excluded.timezone, "
    "paused = excluded.paused, skip_if_running = excluded.skip_if_running, "
    "anchor_at = excluded.anchor_at, updated_at = excluded.updated_at, "
    "next_run_at = CASE WHEN ? THEN excluded.next_run_at ELSE schedules.next_run_at END"
)
DELETE_SCHEDULE = "DELETE FROM schedules WHERE id = ?"
# The guard of a firing: the schedule still waits for the occurrence the scheduler read.
ADVANCE_SCHEDULE = (
    "UPDATE schedules SET next_run_at = ? WHERE id = ? AND next_run_at = ? AND NOT paused "
    "RETURNING last_job_id"
)
INSERT_RUN = (
    "INSERT INTO schedule_runs (schedule_id, scheduled_for, job_id, catch_up, created_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (schedule_id, scheduled_for) DO NOTHING"
)
RAN = "UPDATE schedules SET last_run_at = ?, last_job_id = ? WHERE id = ?"


# -- the kept counts ------------------------------------------------------------------------

# The states counted in `job_counts`, as indexes into a name's four deltas.
PENDING, RESERVED, SUCCEEDED, FAILED = range(4)
TABLE_STATE = {"jobs": PENDING, "succeeded_jobs": SUCCEEDED, "failed_jobs": FAILED}


class Tally:
    """A group's moves between counted states per job name, and of pending jobs in and
    out of due minutes still ahead, written as one upsert per name (and per name and
    minute) just before the group commits.

    On PostgreSQL statement triggers keep `job_counts` and `due_counts` (every replica's
    writes count); on SQLite, where the writer is the only writer, a trigger per row cost
    a third of the batched cycle, so the handlers say what each row did instead
    (migration 0005 dropped the triggers). Every handler that adds, moves or removes a
    job row tallies it."""

    __slots__ = ("deltas", "due_deltas", "minute")

    def __init__(self) -> None:
        self.deltas: dict[str, list[int]] = {}
        self.due_deltas: dict[tuple[str, int], int] = {}
        self.minute = epoch_minute(datetime.now(UTC))  # the system clock, as on PostgreSQL

    def due(self, name: str, available_at: datetime, delta: int) -> None:
        """A pending, unreserved job of `name` due at `available_at` came (+1) or went
        (-1): counted when its minute is still ahead (see `DueCountRow`)."""
        minute = epoch_minute(available_at)
        if minute > self.minute:
            key = (name, minute)
            self.due_deltas[key] = self.due_deltas.get(key, 0) + delta

    def move(self, name: str, source: int | None, target: int | None) -> None:
        """One job of `name` left `source` (None: it is new) for `target` (None: gone)."""
        deltas = self.deltas.get(name)
        if deltas is None:
            deltas = self.deltas[name] = [0, 0, 0, 0]
        if source is not None:
            deltas[source] -= 1
        if target is not None:
            deltas[target] += 1

    def flush(self, conn: sqlite3.Connection, names: tuple[str, ...]) -> None:
        """Write `names`' pending moves now, so that a statement reading `job_counts`
        later in this transaction (a reserve under a concurrency limit) sees them."""
        changed = [(n, *d) for n in names if (d := self.deltas.pop(n, None)) and any(d)]
        if changed:
            conn.executemany(ADD_COUNTS, changed)

    def write(self, conn: sqlite3.Connection) -> None:
        changed = [(name, *d) for name, d in self.deltas.items() if any(d)]
        if changed:
            conn.executemany(ADD_COUNTS, changed)
        due = [(name, minute, n) for (name, minute), n in self.due_deltas.items() if n]
        if due:
            conn.executemany(ADD_DUE, due)


def held(reserved_at: object) -> int:
    """A job row's counted state: reserved while it has `reserved_at`, else pending (a
    lease that expired and was requeued can still be acked, from pending)."""
    return PENDING if reserved_at is None else RESERVED


# -- one handler per kind of write: a run of items in, one result per item out -----------


def _insert_jobs(
    conn: sqlite3.Connection, jobs: list[NewJob], tally: Tally, scheduled: bool = False
) -> None:
    """Jobs of a schedule (`scheduled`) carry its columns; others leave them null, with a
    statement that binds three values fewer per row (batch enqueue is this loop)."""
    for job in jobs:
        tally.move(job.name, None, PENDING)
        tally.due(job.name, job.available_at, 1)
    if scheduled:
        rows = [
            (j.id, j.name, j.payload, 0, j.max_retries, ts(j.created_at), ts(j.available_at), 0,
             j.priority, j.schedule_id, _ts_or_none(j.scheduled_for), j.catch_up)
            for j in jobs
        ]  # fmt: skip
        conn.executemany(INSERT_JOB, rows)
        return
    conn.executemany(
        INSERT_PLAIN_JOB,
        [
            (j.id, j.name, j.payload, 0, j.max_retries, ts(j.created_at), ts(j.available_at), 0,
             j.priority)
            for j in jobs
        ],
    )  # fmt: skip


def enqueue(
    conn: sqlite3.Connection, items: list[tuple[NewJob, datetime]], tally: Tally
) -> list[Job]:
    _insert_jobs(conn, [job for job, _ in items], tally)
    return [new_job(job, now) for job, now in items]


def enqueue_leased(
    conn: sqlite3.Connection, items: list[tuple[NewJob, datetime, str, datetime]], tally: Tally
) -> list[Lease | None]:
    leases: list[Lease | None] = []
    rows = []
    for job, now, worker, expires in items:
        if conn.execute(IS_HELD, (job.name,)).fetchone() is not None:
            _insert_jobs(conn, [job], tally)  # paused or limited: enqueued, not leased
            leases.append(None)
            continue
        lease = handed_lease(job, now, worker, expires)
        leases.append(lease)
        tally.move(job.name, None, RESERVED)
        rows.append(
            (job.id, job.name, job.payload, job.max_retries, ts(job.created_at),
             ts(job.available_at), ts(now), worker, lease.id, ts(expires), job.priority)
        )  # fmt: skip
    conn.executemany(INSERT_LEASED, rows)
    return leases


def enqueue_many(
    conn: sqlite3.Connection, items: list[tuple[list[NewJob], datetime]], tally: Tally
) -> list[list[Job]]:
    results = []
    for jobs, now in items:
        _insert_jobs(conn, jobs, tally)
        results.append([new_job(job, now) for job in jobs])
    return results


def _get(conn: sqlite3.Connection, job_id: str, now: datetime) -> AnyJob | None:
    row = conn.execute(SELECT_JOB, (job_id,)).fetchone()
    if row is not None:
        return job_from(_times(row, *JOB_TIMES), now)
    row = conn.execute(SELECT_SUCCEEDED, (job_id,)).fetchone()
    if row is not None:
        values = _times(row, *SUCCEEDED_TIMES)
        values[10] = flag(values[10])
        return SucceededJob(*values)
    row = conn.execute(SELECT_FAILED, (job_id,)).fetchone()
    if row is None:
        return None
    values = _times(row, *FAILED_TIMES)
    values[11] = flag(values[11])
    return FailedJob(*values)


def _claim(
    conn: sqlite3.Connection, key: IdempotencyKey, now: datetime, job_ids: str, batch: bool
) -> tuple[str, str] | None:
    """Claim the key for `job_ids`, or return (fingerprint, job ids) of its live earlier use.
    The writer is the only writer, so no other request can claim it in between."""
    table = KEY_TABLES[batch]
    id_column = "job_ids" if batch else "job_id"
    used = conn.execute(
        f"SELECT fingerprint, {id_column}, created_at FROM {table} WHERE key = ?", (key.key,)
    ).fetchone()
    if used is not None and dt(used[2]) >= key.not_before:
        return used[0], used[1]
    conn.execute(f"DELETE FROM {table} WHERE key = ?", (key.key,))  # expired: start afresh
    conn.execute(
        f"INSERT INTO {table} (key, fingerprint, {id_column}, created_at) VALUES (?, ?, ?, ?)",
        (key.key, key.fingerprint, job_ids, ts(now)),
    )
    return None


def enqueue_once(
    conn: sqlite3.Connection, items: list[tuple[NewJob, datetime, IdempotencyKey]], tally: Tally
) -> list[Enqueued]:
    results = []
    for job, now, key in items:
        used = _claim(conn, key, now, job.id, batch=False)
        if used is None:
            _insert_jobs(conn, [job], tally)
            results.append(Enqueued(new_job(job, now), created=True))
        else:
            same = used[0] == key.fingerprint
            results.append(Enqueued(_get(conn, used[1], now), created=False, same_request=same))
    return results


def enqueue_many_once(
    conn: sqlite3.Connection,
    items: list[tuple[list[NewJob], datetime, IdempotencyKey]],
    tally: Tally,
) -> list[EnqueuedBatch]:
    results = []
    for jobs, now, key in items:
        used = _claim(conn, key, now, ",".join(job.id for job in jobs), batch=True)
        if used is None:
            _insert_jobs(conn, jobs, tally)
            created = [new_job(job, now) for job in jobs]
            results.append(EnqueuedBatch([job.id for job in jobs], list(created), created=True))
        else:
            ids = used[1].split(",")
            found = [_get(conn, job_id, now) for job_id in ids]
            same = used[0] == key.fingerprint
            results.append(EnqueuedBatch(ids, found, created=False, same_request=same))
    return results


def reserve(
    conn: sqlite3.Connection, items: list[tuple[Any, ...]], tally: Tally
) -> list[list[Lease]]:
    results = []
    for names, worker_id, max_jobs, now, expires_at, max_bytes in items:
        params: dict[str, Any] = {f"n{i}": name for i, name in enumerate(names)}
        params.update(
            now=ts(now),
            max_jobs=max_jobs,
            max_bytes=NO_LIMIT if max_bytes is None else max_bytes,
            worker=worker_id,
            expires=ts(expires_at),
        )
        tally.flush(conn, names)
        rows = conn.execute(reserve_sql(len(names)), params).fetchall()
        # A reserved job was due by now: its minute is never read again (see DueCountRow).
        spent: dict[str, int] = {}
        for row in rows:
            tally.move(row[1], PENDING, RESERVED)
            spent[row[1]] = spent.get(row[1], 0) + 1
        for name, count in spent.items():
            conn.execute(SPEND, {"now": params["now"], "spent": count, "name": name})
        results.append(leases_from([_times(row, *JOB_TIMES) for row in rows], expires_at))
    return results


def ack(
    conn: sqlite3.Connection, items: list[tuple[str, str, datetime]], tally: Tally
) -> list[SucceededJob | None]:
    results: list[SucceededJob | None] = []
    inserts = []
    for job_id, lease_id, now in items:
        row = conn.execute(ACK, (job_id, lease_id)).fetchone()
        if row is None:
            results.append(None)
            continue
        job_id, name, payload, attempts, lease_seq, created_at, available_at, leased, rank = row[:9]
        schedule_id, scheduled_for, catch_up = row[9:12]
        tally.move(name, held(leased), SUCCEEDED)
        if leased is None:
            tally.due(name, dt(available_at), -1)
        inserts.append(
            (job_id, name, payload, attempts, lease_seq, created_at, available_at, ts(now), rank,
             schedule_id, scheduled_for, catch_up)
        )  # fmt: skip
        done = SucceededJob(
            job_id, name, payload, attempts, dt(created_at), dt(available_at), now, rank,
            schedule_id, _dt_or_none(scheduled_for), flag(catch_up),
        )  # fmt: skip
        done.leased_at = None if leased is None else dt(leased)
        results.append(done)
    conn.executemany(INSERT_SUCCEEDED, inserts)
    _count_finished(conn, [(row[1], dt(row[7])) for row in inserts], succeeded=True)
    return results


def _count_finished(
    conn: sqlite3.Connection, finished: list[tuple[str, datetime]], succeeded: bool
) -> None:
    """Add (name, finished at) pairs to the per-minute counts, one upsert per name and
    minute, in the transaction that finished the jobs."""
    conn.executemany(
        COUNT_FINISHED,
        [
            (name, ts(minute), count if succeeded else 0, 0 if succeeded else count)
            for (name, minute), count in per_minute(finished).items()
        ],
    )


def fail(
    conn: sqlite3.Connection, items: list[tuple[Any, ...]], tally: Tally
) -> list[FailOutcome | None]:
    results: list[FailOutcome | None] = []
    buried: list[tuple[str, datetime]] = []
    for job_id, lease_id, now, exception, decide, expired_before in items:
        if expired_before is None:
            row = conn.execute(HELD, (job_id, lease_id)).fetchone()
        else:
            row = conn.execute(HELD_EXPIRED, (job_id, lease_id, ts(expired_before))).fetchone()
        if row is None:
            results.append(None)
            continue
        job_id, name, payload, attempts, max_retries, created, available, lease_seq = row[:8]
        leased, rank = row[8], row[9]
        schedule = (row[10], _dt_or_none(row[11]), flag(row[12]))
        leased_at = None if leased is None else dt(leased)
        if leased is None:  # its lease ran out and it was requeued: it leaves its due minute
            tally.due(name, dt(available), -1)
        retry_at = decide(attempts, max_retries)
        if retry_at is not None:
            conn.execute(REQUEUE, (ts(retry_at), job_id))
            tally.move(name, held(leased), PENDING)
            tally.due(name, retry_at, 1)
            job = [job_id, name, payload, attempts, max_retries, dt(created), retry_at]
            job += [None, None, None, rank, *schedule]  # no longer reserved
            results.append(Retrying(job_from(job, now), leased_at))
            continue
        conn.execute(DELETE_JOB, (job_id,))
        tally.move(name, held(leased), FAILED)
        values = (job_id, name, payload, attempts, max_retries, lease_seq, exception)
        stored = (row[10], row[11], row[12])
        conn.execute(INSERT_FAILED, (*values, created, available, ts(now), rank, *stored))
        buried.append((name, now))
        failed = FailedJob(
            job_id, name, payload, attempts, exception, dt(created), dt(available), now, rank,
            *schedule,
        )  # fmt: skip
        results.append(Buried(failed, leased_at))
    _count_finished(conn, buried, succeeded=False)
    return results


def extend(
    conn: sqlite3.Connection, items: list[tuple[str, str, datetime]], _tally: Tally
) -> list[bool]:
    return [
        conn.execute(EXTEND, (ts(expires_at), job_id, lease_id)).rowcount == 1
        for job_id, lease_id, expires_at in items
    ]


def release(
    conn: sqlite3.Connection, items: list[tuple[str, str, datetime]], tally: Tally
) -> list[Job | None]:
    results: list[Job | None] = []
    for job_id, lease_id, now in items:
        row = conn.execute(RELEASE, (job_id, lease_id)).fetchone()
        if row is None:
            results.append(None)
            continue
        values = _times(row, *JOB_TIMES)
        tally.move(values[1], RESERVED, PENDING)  # due already, as when it was reserved
        conn.execute(REFUND, (values[1],))  # given back unused: its token too
        results.append(job_from(values, now))
    return results


def cancel(
    conn: sqlite3.Connection, items: list[tuple[str, DeleteScope]], tally: Tally
) -> list[CancelResult]:
    def one(job_id: str, scope: DeleteScope) -> CancelResult:
        if scope in ("any", "pending"):
            row = conn.execute(CANCEL_PENDING, (job_id,)).fetchone()
            if row is not None:
                tally.move(row[0], PENDING, None)
                tally.due(row[0], dt(row[1]), -1)
                return "deleted"
            if conn.execute(IS_PENDING, (job_id,)).fetchone() is not None:
                return "reserved"
        for table, sql in DELETE_FINISHED.items():
            if scope in ("any", table):
                row = conn.execute(sql, (job_id,)).fetchone()
                if row is not None:
                    tally.move(row[0], SUCCEEDED if table == "succeeded" else FAILED, None)
                    return "deleted"
        return "missing"

    return [one(job_id, scope) for job_id, scope in items]


def retry_failed(
    conn: sqlite3.Connection, items: list[tuple[str, datetime]], tally: Tally
) -> list[Job | None]:
    results: list[Job | None] = []
    for job_id, now in items:
        row = conn.execute(TAKE_FAILED, (job_id,)).fetchone()
        if row is None:
            results.append(None)
            continue
        job_id, name, payload, max_retries, created_at, lease_seq, rank = row[:7]
        tally.move(name, FAILED, PENDING)
        tally.due(name, now, 1)
        values = (job_id, name, payload, 0, max_retries, created_at, ts(now), lease_seq, rank)
        conn.execute(INSERT_JOB, (*values, *row[7:10]))
        created = dt(created_at)
        results.append(
            Job(job_id, name, payload, 0, max_retries, created, now, None, None, "available",
                None, rank, row[7], _dt_or_none(row[8]), flag(row[9]))
        )  # fmt: skip
    return results


def prune(
    conn: sqlite3.Connection, items: list[tuple[str, datetime, int]], tally: Tally
) -> list[int]:
    results = []
    for kind, before, limit in items:
        table, key, stamp = PRUNED[kind]
        sql = (
            f"DELETE FROM {table} WHERE {key} IN "
            f"(SELECT {key} FROM {table} WHERE {stamp} < ? ORDER BY {stamp} LIMIT ?)"
        )
        bound = prune_bound(kind, before)
        bound = ts(bound) if isinstance(bound, datetime) else bound
        state = TABLE_STATE.get(table)
        if state is None:
            results.append(conn.execute(sql, (bound, limit)).rowcount)
            continue
        names = conn.execute(sql + " RETURNING name", (bound, limit)).fetchall()
        for (name,) in names:
            tally.move(name, state, None)
        results.append(len(names))
    return results


def configure_queue(
    conn: sqlite3.Connection, items: list[tuple[str, QueueChange, datetime]], _tally: Tally
) -> list[None]:
    for name, change, now in items:
        sql, values = queue_upsert(change, ts(now), "?")
        conn.execute(sql, (name, *values))
    return [None] * len(items)


def put_schedule(
    conn: sqlite3.Connection, items: list[tuple[Schedule, bool]], _tally: Tally
) -> list[None]:
    for s, retimed in items:
        conn.execute(
            PUT_SCHEDULE,
            (s.id, s.name, s.payload, s.max_retries, s.priority, s.interval_ms, s.cron,
             s.timezone, s.paused, s.skip_if_running, ts(s.anchor_at),
             _ts_or_none(s.next_run_at), ts(s.created_at), ts(s.updated_at), retimed),
        )  # fmt: skip
    return [None] * len(items)


def delete_schedule(conn: sqlite3.Connection, items: list[str], _tally: Tally) -> list[bool]:
    return [conn.execute(DELETE_SCHEDULE, (some_id,)).rowcount == 1 for some_id in items]


def fire_schedule(
    conn: sqlite3.Connection, items: list[tuple[Firing, NewJob]], tally: Tally
) -> list[FireResult]:
    """See Storage.fire_schedule. The writer is the only writer, so nothing moves between
    the guard and the inserts; the run record's key still refuses a second enqueue."""
    results: list[FireResult] = []
    for f, job in items:
        guard = (_ts_or_none(f.next_run_at), f.schedule_id, ts(f.expected_next))
        row = conn.execute(ADVANCE_SCHEDULE, guard).fetchone()
        if row is None:
            results.append("stale")
            continue
        run = (f.schedule_id, ts(f.scheduled_for))
        running = row[0] is not None and conn.execute(IS_PENDING, (row[0],)).fetchone()
        if f.skip_if_running and running:
            skipped = conn.execute(INSERT_RUN, (*run, None, f.catch_up, ts(f.now))).rowcount
            results.append("skipped" if skipped else "duplicate")
            continue
        if conn.execute(INSERT_RUN, (*run, job.id, f.catch_up, ts(f.now))).rowcount == 0:
            results.append("duplicate")
            continue
        _insert_jobs(conn, [job], tally, scheduled=True)
        conn.execute(RAN, (ts(f.scheduled_for), job.id, f.schedule_id))
        results.append(new_job(job, f.now))
    return results


def probe(conn: sqlite3.Connection, items: list[None], _tally: Tally) -> list[None]:
    conn.execute("PRAGMA user_version = 0")  # rewrites the header page: a real write
    return [None for _ in items]


# Writes a power loss may undo without breaking a promise (see SqliteStorage._sync_for).
VOLATILE = frozenset({"reserve", "extend", "release", "probe"})
# Kinds that may take long (a batch of hundreds of deletes): never run on the loop.
OFF_LOOP = frozenset({"prune"})

HANDLERS: dict[str, Callable[[sqlite3.Connection, list[Any], Tally], list[Any]]] = {
    "enqueue": enqueue,
    "enqueue_leased": enqueue_leased,
    "enqueue_many": enqueue_many,
    "enqueue_once": enqueue_once,
    "enqueue_many_once": enqueue_many_once,
    "reserve": reserve,
    "ack": ack,
    "fail": fail,
    "extend": extend,
    "release": release,
    "cancel": cancel,
    "retry_failed": retry_failed,
    "prune": prune,
    "probe": probe,
    "configure_queue": configure_queue,
    "put_schedule": put_schedule,
    "delete_schedule": delete_schedule,
    "fire_schedule": fire_schedule,
}


class SqliteStorage(SqlStorage):
    def __init__(self, url: str, synchronous: str = "FULL") -> None:
        database = make_url(url).database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._database = database
        self._synchronous = synchronous
        self.engine = create_async_engine(url, pool_size=4, max_overflow=8)
        self._install_pragmas()
        # The writer's own connection lives in its own thread: one hop per group.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bgjobs-sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        self._current_sync = synchronous
        self._writer = Writer(self._apply)

    def _configure(self, conn: Any) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")

    def _install_pragmas(self) -> None:
        @event.listens_for(self.engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            self._configure(cursor)
            cursor.close()

        @event.listens_for(self.engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    def _is_outage(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None)
        if isinstance(orig, sqlite3.Error):
            return is_outage(orig)
        return super()._is_outage(exc)

    async def close(self) -> None:
        await super().close()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_connection)
        self._thread.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sync_for(self, conn: sqlite3.Connection, group: list[Op]) -> None:
        """Only commits that must survive a power loss wait for the disk. A lease, its
        extension or its release may be lost with the machine: the job then simply comes
        back (as after an expiry). In WAL mode the next synced commit makes every earlier
        frame durable too."""
        wanted = self._synchronous
        if wanted in ("FULL", "EXTRA") and all(op.kind in VOLATILE for op in group):
            wanted = "NORMAL"
        if wanted != self._current_sync:
            conn.execute(f"PRAGMA synchronous={wanted}")
            self._current_sync = wanted

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = self._database.startswith("file:")
            conn = sqlite3.connect(
                self._database,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
                uri=uri,
            )
            self._configure(conn)
            self._current_sync = self._synchronous
            self._conn = conn
        return self._conn

    async def _apply_group(self, group: list[Op]) -> list[Any]:
        """A lone write runs right here: on a server pinned to one core, a hop to another
        thread waits for this one to sleep, which costs more than the write. A group goes
        to the writer's thread, so its commit overlaps with reading the next requests; so
        does a prune batch, so that requests go on while it deletes."""
        if len(group) == 1 and group[0].kind not in OFF_LOOP:
            return self._run(group)
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, group)

    def _run(self, group: list[Op]) -> list[Any]:
        """The whole group in one BEGIN IMMEDIATE ... COMMIT (calls never overlap: the
        writer runs one group at a time)."""
        try:
            conn = self._connection()
            self._sync_for(conn, group)
            conn.execute("BEGIN IMMEDIATE")
            try:
                results: list[Any] = []
                tally = Tally()
                for kind, run in runs(group):
                    results.extend(HANDLERS[kind](conn, [op.arg for op in run], tally))
                tally.write(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if is_outage(exc):
                raise StorageUnavailable(f"database unavailable: {exc}") from exc
            raise
        return results
