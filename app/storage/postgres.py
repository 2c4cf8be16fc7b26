"""PostgreSQL: the scale-out backend, for several replicas of the server on one database.

Writes go through one group-commit writer per replica, on one dedicated asyncpg
connection: a group of requests is one transaction. The hot-path statements are written
here once and prepared once per connection by asyncpg. Replicas never hand out the same
job and never wait on each other's rows: reserve locks the rows it takes with FOR UPDATE
SKIP LOCKED. A group that makes jobs ready announces them with one NOTIFY per name,
delivered at its commit, and every replica LISTENs on one dedicated connection, so a long
poll on any replica wakes within milliseconds of an enqueue on another.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg
from sqlalchemy import func, select
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
    Hold,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    QueueChange,
    QueueSettings,
    Retrying,
    SucceededJob,
)
from app.queue.ports import CancelResult, DeleteScope, FireResult
from app.queue.schedules import Firing, Schedule
from app.storage import migrate
from app.storage.common import (
    FAILED_COLUMNS,
    JOB_COLUMNS,
    PRUNED,
    SCHEDULE_COLUMNS,
    SCHEDULE_FIELDS,
    SUCCEEDED_COLUMNS,
    SqlStorage,
    handed_lease,
    job_from,
    leases_from,
    new_job,
    per_minute,
    prune_bound,
    queue_upsert,
)
from app.storage.writer import Op, Writer, runs

log = logging.getLogger("bgjobs.storage.postgres")

CHANNEL = "bgjobs_ready"
EVENTS_CHANNEL = "bgjobs_events"  # job changes for other replicas' event streams (relay)
MIGRATION_LOCK = 0x6267_6A6F_6273  # "bgjobs": one replica migrates, the others wait for it
KEEPALIVE_S = 5.0
NO_LIMIT = 1 << 62

# Errors that mean the database cannot be reached or written now (a 503), as opposed to
# a bug in a statement or its data (a 500).
OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


# -- statements ---------------------------------------------------------------------------

INSERT_JOB = (
    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, "
    "lease_seq, priority, schedule_id, scheduled_for, catch_up) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
# Many jobs in one statement: asyncpg encodes each column as one array, in C.
INSERT_JOBS = """
INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, lease_seq,
    priority, schedule_id, scheduled_for, catch_up)
SELECT id, name, payload, 0, max_retries, created_at, available_at, 0, priority, schedule_id,
    scheduled_for, catch_up
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::timestamptz[],
    $7::smallint[], $8::text[], $9::timestamptz[], $10::boolean[])
    AS t(id, name, payload, max_retries, created_at, available_at, priority, schedule_id,
        scheduled_for, catch_up)
"""
# Ordinary jobs, whose schedule columns stay null: three arrays fewer to encode and unnest.
INSERT_PLAIN_JOBS = """
INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at, lease_seq,
    priority)
SELECT id, name, payload, 0, max_retries, created_at, available_at, 0, priority
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::timestamptz[],
    $7::smallint[]) AS t(id, name, payload, max_retries, created_at, available_at, priority)
"""
# A lone enqueue, and its announcement, in one statement: atomic by itself, so one round
# trip instead of four (BEGIN, INSERT, NOTIFY, COMMIT), each of which pays for waking the
# database's process when the server has been idle. The NOTIFY goes out at its commit.
ENQUEUE_ONE = f"WITH inserted AS ({INSERT_PLAIN_JOBS}) SELECT pg_notify($8, $9)"
# A job handed straight to a waiting poll: inserted already reserved, with its first lease
# (no NOTIFY: nobody else can take it).
# Unless its name is paused or limited: then it is only enqueued (`leased` false), and a
# limited name's polls lease it through the reserve statement, which checks the limits.
INSERT_LEASED = """
INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, available_at,
    lease_seq, reserved_at, reserved_by, lease_id, lease_expires_at, priority)
SELECT $1, $2, $3, CASE WHEN p THEN 0 ELSE 1 END, $4, $5, $6, CASE WHEN p THEN 0 ELSE 1 END,
    CASE WHEN p THEN NULL ELSE $7::timestamptz END, CASE WHEN p THEN NULL ELSE $8 END,
    CASE WHEN p THEN NULL ELSE $9 END, CASE WHEN p THEN NULL ELSE $10::timestamptz END, $11
FROM (SELECT EXISTS (SELECT 1 FROM queues WHERE name = $2 AND (paused
    OR concurrency_limit IS NOT NULL OR rate_count IS NOT NULL)) AS p) AS q
RETURNING reserved_at IS NOT NULL AS leased
"""
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
SELECT_SUCCEEDED = f"SELECT {SUCCEEDED_COLUMNS} FROM succeeded_jobs WHERE id = $1"
SELECT_FAILED = f"SELECT {FAILED_COLUMNS} FROM failed_jobs WHERE id = $1"

# The name as a range, not `jobs.name = n.name`: with an equality the planner drops the
# name from the sort order, and then `ix_jobs_available_at` serves `ORDER BY available_at,
# id` too, filtering by name. When one name holds most of the backlog and another's jobs
# are older, ANALYZE's statistics made it pick that walk past every older job (26 ms a
# reserve at 460,000 jobs). As a range the name stays in the order, which only
# `ix_jobs_ready` gives (tests/test_postgres.py). Equal for deterministic collations.
ONE_NAME = "jobs.name >= n.name AND jobs.name <= n.name"
# The names asked for, less those paused or limited: a pause holds in the statement
# itself, on every replica, from its commit on; limited names go through RESERVE_LIMITED.
FREE = (
    "SELECT name FROM unnest($1::text[]) AS u(name) "
    "WHERE NOT EXISTS (SELECT 1 FROM queues WHERE queues.name = u.name AND (paused "
    "OR concurrency_limit IS NOT NULL OR rate_count IS NOT NULL))"
)


def _ranges(names: str, limit: str) -> str:
    """Per name of `names` (rows with `name`, aliased n), its oldest ready jobs by
    priority, at most `limit`: one range of `ix_jobs_ready_priority` each, locked FOR
    UPDATE SKIP LOCKED so concurrent reserves on any replica pass over each other's rows
    instead of waiting or double-booking them."""
    return f"""
    SELECT c.id, c.priority, c.available_at, c.size FROM {names} CROSS JOIN LATERAL (
        SELECT id, priority, available_at, octet_length(payload) AS size FROM jobs
        WHERE {ONE_NAME} AND reserved_at IS NULL AND available_at <= $2
        ORDER BY jobs.name, priority, available_at, id LIMIT {limit}
        FOR UPDATE SKIP LOCKED
    ) AS c"""


def _first(names: str, limit: str) -> str:
    """The single-row form of `_ranges`: the id of one name's oldest ready job."""
    return f"""
    SELECT c.id FROM {names} CROSS JOIN LATERAL (
        SELECT id FROM jobs
        WHERE {ONE_NAME} AND reserved_at IS NULL AND available_at <= $2
        ORDER BY jobs.name, priority, available_at, id LIMIT {limit}
        FOR UPDATE SKIP LOCKED
    ) AS c"""


# Of the candidates, the first $3 by priority and age, within the payload budget: the
# running total of payload sizes stops the pick before it passes $4 bytes (the first row
# always goes). Rows locked but not picked are unlocked at commit, a moment later.
PICKED = """
    SELECT id FROM (
        SELECT id, row_number() OVER w AS n, sum(size) OVER w AS total
        FROM (SELECT * FROM candidates ORDER BY priority, available_at, id LIMIT $3) AS first
        WINDOW w AS (ORDER BY priority, available_at, id ROWS UNBOUNDED PRECEDING)
    ) AS sized
    WHERE n = 1 OR total <= $4"""


def _lease(worker: str, expires: str) -> str:
    """The UPDATE that grants the next lease of the rows it matches."""
    return f"""UPDATE jobs SET attempts = attempts + 1, reserved_at = $2, reserved_by = {worker},
    lease_seq = lease_seq + 1, lease_id = id || '.' || (lease_seq + 1)::text,
    lease_expires_at = {expires}"""


# Reserve: the names asked for, less the paused and limited ones, merged by priority and
# age. The MATERIALIZED CTE is an optimization fence: as a plain IN (sub-select) the
# planner may run the LIMITed pick more than once and lock more rows than it returns.
RESERVE = f"""
WITH candidates AS ({_ranges(f"({FREE}) AS n", "$3")}
), picked AS MATERIALIZED ({PICKED}
)
{_lease("$5", "$6")}
WHERE id IN (SELECT id FROM picked) AND reserved_at IS NULL
RETURNING {JOB_COLUMNS}, lease_id
"""
# The most common reserve, one job of one name, needs neither the merge of names nor the
# payload budget (the first job always goes): a single-row pick, evaluated once (an
# InitPlan), at about half the database's CPU of the general statement. The name comes
# through unnest like there, so the planner always takes the ready index's range.
RESERVE_ONE = f"""
{_lease("$3", "$4")}
WHERE id = ({_first(f"({FREE}) AS n", "1")}
) AND reserved_at IS NULL
RETURNING {JOB_COLUMNS}, lease_id
"""
# Limited names: before this statement the transaction locks their `queues` rows
# (LOCK_LIMITED), so reserves of a limited name on every replica take turns, and this
# statement's snapshot, taken after the lock was granted, sees the reserves committed
# before it: `job_counts` (kept by statement triggers in each writing transaction) holds
# their reserved jobs exactly. Acks, fails and expiries do not lock: a count they have
# not yet lowered only makes the check stricter. Per name, the range's LIMIT is its
# room: the request's max_jobs, less what a pause, the concurrency limit or the rate
# limit forbids now. Tokens are counted on the database's clock (clock_timestamp: after
# the lock wait) and spent in the same statement.
LOCK_LIMITED = """
SELECT name FROM queues WHERE name = ANY($1::text[])
    AND (concurrency_limit IS NOT NULL OR rate_count IS NOT NULL)
ORDER BY name FOR UPDATE
"""
TOKENS = """CASE WHEN q.rate_count IS NOT NULL THEN LEAST(1.0, q.tokens + GREATEST(0.0,
    extract(epoch FROM clock_timestamp() - q.tokens_at) * 1000.0) * q.rate_count / q.rate_per_ms)
    END"""  # LEAST skips nulls: without the CASE, no rate limit would read as one token


def rooms(most: str) -> str:
    """Per name asked for ($1), how many jobs it may lease now, at most `most`."""
    return f"""
    SELECT u.name, CASE WHEN q.name IS NULL THEN {most} WHEN q.paused THEN 0
        ELSE GREATEST(0, LEAST({most},
            COALESCE(q.concurrency_limit - (SELECT COALESCE(sum(c.reserved), 0)
                FROM job_counts c WHERE c.name = u.name), {most}),
            COALESCE(floor({TOKENS})::int, {most}))) END AS room
    FROM unnest($1::text[]) AS u(name) LEFT JOIN queues q ON q.name = u.name"""


# What a limited reserve spent of its names' buckets, from its `leased` rows.
SPENT = f"""
    UPDATE queues q SET tokens = GREATEST(0.0, {TOKENS} - s.n), tokens_at = clock_timestamp()
    FROM (SELECT name, count(*) AS n FROM leased GROUP BY name) AS s
    WHERE q.name = s.name AND q.rate_count IS NOT NULL
    RETURNING q.name"""
RESERVE_LIMITED = f"""
WITH n AS ({rooms("$3")}
), candidates AS ({_ranges("n", "n.room")}
), picked AS MATERIALIZED ({PICKED}
), leased AS (
    {_lease("$5", "$6")}
    WHERE id IN (SELECT id FROM picked) AND reserved_at IS NULL
    RETURNING {JOB_COLUMNS}, lease_id
), spent AS ({SPENT}
)
SELECT * FROM leased WHERE (SELECT count(*) FROM spent) >= 0
"""
# The limited form of RESERVE_ONE (one name, one job).
RESERVE_LIMITED_ONE = f"""
WITH n AS ({rooms("1")}
), leased AS (
    {_lease("$3", "$4")}
    WHERE id = ({_first("n", "n.room")}
    ) AND reserved_at IS NULL
    RETURNING {JOB_COLUMNS}, lease_id
), spent AS ({SPENT}
)
SELECT * FROM leased WHERE (SELECT count(*) FROM spent) >= 0
"""
# Ack, set-based: one statement moves a whole run of acks to the succeeded jobs and adds
# them to the per-minute counts (one row per name and minute, on this connection's shard);
# fencing is the (id, lease_id) match. A pair given twice matches its row once. A name
# among $6 (the limited ones) is announced (payload $5 || name on channel $4): a slot of
# it is free for other replicas' polls. In the statement, not after it: a NOTIFY of its
# own would be a transaction of its own, with a commit that waits for the disk.
ACK = """
WITH done AS (
    DELETE FROM jobs USING unnest($1::text[], $2::text[], $3::timestamptz[]) AS t(id, lease_id, at)
    WHERE jobs.id = t.id AND jobs.lease_id = t.lease_id
    RETURNING jobs.id, jobs.lease_id, jobs.name, jobs.payload, jobs.attempts, jobs.lease_seq,
        jobs.created_at, jobs.available_at, t.at, jobs.reserved_at, jobs.priority,
        jobs.schedule_id, jobs.scheduled_for, jobs.catch_up
), moved AS (
    INSERT INTO succeeded_jobs (id, name, payload, attempts, lease_seq, created_at,
        available_at, succeeded_at, priority, schedule_id, scheduled_for, catch_up)
    SELECT id, name, payload, attempts, lease_seq, created_at, available_at, at, priority,
        schedule_id, scheduled_for, catch_up
    FROM done
), counted AS (
    INSERT INTO finished_per_minute AS f (name, minute, shard, succeeded, failed)
    SELECT name, date_trunc('minute', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
        pg_backend_pid() % 16, count(*), 0
    FROM done GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (name, minute, shard) DO UPDATE SET succeeded = f.succeeded + excluded.succeeded
), freed AS (
    SELECT pg_notify($4, $5 || name) FROM (SELECT DISTINCT name FROM done) AS d
    WHERE name = ANY($6::text[])
)
SELECT id, lease_id, name, payload, attempts, created_at, available_at, at, reserved_at,
    priority, schedule_id, scheduled_for, catch_up
FROM done WHERE (SELECT count(*) FROM freed) >= 0
"""
# Per-minute counts of jobs finally failed, added at the end of the transaction that
# failed them: one row per name and minute, on this connection's shard (so replicas
# never wait on each other's rows), in key order (so transactions never deadlock).
COUNT_FAILED = """
INSERT INTO finished_per_minute AS f (name, minute, shard, succeeded, failed)
SELECT name, minute, pg_backend_pid() % 16, 0, n
FROM unnest($1::text[], $2::timestamptz[], $3::int[]) AS t(name, minute, n) ORDER BY 1, 2
ON CONFLICT (name, minute, shard) DO UPDATE SET failed = f.failed + excluded.failed
"""
HELD = (
    "SELECT id, name, payload, attempts, max_retries, created_at, available_at, lease_seq, "
    f"reserved_at, priority, {SCHEDULE_COLUMNS} FROM jobs WHERE id = $1 AND lease_id = $2"
)
HELD_FOR_FAIL = HELD + " FOR UPDATE"
HELD_EXPIRED = HELD + " AND reserved_at IS NOT NULL AND lease_expires_at <= $3 FOR UPDATE"
REQUEUE = (
    "UPDATE jobs SET available_at = $1, reserved_at = NULL, reserved_by = NULL, "
    "lease_expires_at = NULL WHERE id = $2"
)
DELETE_JOB = "DELETE FROM jobs WHERE id = $1"
INSERT_FAILED = (
    "INSERT INTO failed_jobs (id, name, payload, attempts, max_retries, lease_seq, exception, "
    f"created_at, available_at, failed_at, priority, {SCHEDULE_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)
EXTEND = (
    "UPDATE jobs SET lease_expires_at = $1 "
    "WHERE id = $2 AND lease_id = $3 AND reserved_at IS NOT NULL"
)
# A lease given back unused gives its rate-limit token back too.
RELEASE = f"""
WITH released AS (
    UPDATE jobs SET reserved_at = NULL, reserved_by = NULL, lease_id = NULL,
        lease_expires_at = NULL, attempts = attempts - 1
    WHERE id = $1 AND lease_id = $2 AND reserved_at IS NOT NULL RETURNING {JOB_COLUMNS}
), refunded AS (
    UPDATE queues SET tokens = LEAST(1.0, tokens + 1) FROM released
    WHERE queues.name = released.name AND queues.rate_count IS NOT NULL
    RETURNING queues.name
)
SELECT * FROM released WHERE (SELECT count(*) FROM refunded) >= 0
"""
CANCEL_PENDING = "DELETE FROM jobs WHERE id = $1 AND reserved_at IS NULL"
IS_PENDING = "SELECT 1 FROM jobs WHERE id = $1"
DELETE_FINISHED = {
    "succeeded": "DELETE FROM succeeded_jobs WHERE id = $1",
    "failed": "DELETE FROM failed_jobs WHERE id = $1",
}
TAKE_FAILED = (
    "DELETE FROM failed_jobs WHERE id = $1 "
    f"RETURNING id, name, payload, max_retries, created_at, lease_seq, priority, {SCHEDULE_COLUMNS}"
)
KEY_TABLES = {False: ("idempotency_keys", "job_id"), True: ("batch_idempotency_keys", "job_ids")}
NOTIFY = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"

PUT_SCHEDULE = f"""
INSERT INTO schedules ({SCHEDULE_FIELDS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL, NULL, $13, $14)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, payload = excluded.payload,
    max_retries = excluded.max_retries, priority = excluded.priority,
    interval_ms = excluded.interval_ms, cron = excluded.cron, timezone = excluded.timezone,
    paused = excluded.paused, skip_if_running = excluded.skip_if_running,
    anchor_at = excluded.anchor_at, updated_at = excluded.updated_at,
    next_run_at = CASE WHEN $15 THEN excluded.next_run_at ELSE schedules.next_run_at END
"""
DELETE_SCHEDULE = "DELETE FROM schedules WHERE id = $1"
# The guard of a firing: the schedule still waits for the occurrence the scheduler read.
# Its row lock makes a second replica firing the same occurrence wait for this commit, and
# then find next_run_at moved on (READ COMMITTED re-checks the WHERE on the new row).
ADVANCE_SCHEDULE = """
UPDATE schedules SET next_run_at = $1 WHERE id = $2 AND next_run_at = $3 AND NOT paused
RETURNING last_job_id
"""
INSERT_RUN = """
INSERT INTO schedule_runs (schedule_id, scheduled_for, job_id, catch_up, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (schedule_id, scheduled_for) DO NOTHING
RETURNING schedule_id
"""
RAN = "UPDATE schedules SET last_run_at = $1, last_job_id = $2 WHERE id = $3"


class Group:
    """What one transaction made ready, per name (announced with one NOTIFY each), and
    the jobs it finally failed (counted per name and minute at its end). A lease of a
    limited name that ends is announced too: another replica's polls may take its place."""

    def __init__(self, sender: str = "", limited: frozenset[str] = frozenset()) -> None:
        self.ready: dict[str, datetime] = {}
        self.buried: list[tuple[str, datetime]] = []
        self.sender = sender  # this replica, in its notifications
        self.limited = limited  # names with a limit, as this replica knows them

    def announce(self, name: str, available_at: datetime) -> None:
        known = self.ready.get(name)
        if known is None or available_at < known:
            self.ready[name] = available_at


Conn: TypeAlias = Any  # an asyncpg.Connection (asyncpg ships no type hints)


# -- one handler per kind of write: a run of items in, one result per item out -----------


async def _insert_jobs(
    conn: Conn, group: Group, jobs: list[NewJob], scheduled: bool = False
) -> None:
    """Jobs of a schedule (`scheduled`) carry its columns; others leave them null."""
    columns: tuple[list[Any], ...] = tuple([] for _ in range(10 if scheduled else 7))
    for job in jobs:
        row = _row(job) + ((job.schedule_id, job.scheduled_for, job.catch_up) if scheduled else ())
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        group.announce(job.name, job.available_at)
    await conn.execute(INSERT_JOBS if scheduled else INSERT_PLAIN_JOBS, *columns)


def _row(job: NewJob) -> tuple[Any, ...]:
    """An ordinary job's columns, as INSERT_PLAIN_JOBS takes them."""
    return (
        job.id, job.name, job.payload, job.max_retries, job.created_at, job.available_at,
        job.priority,
    )  # fmt: skip


async def enqueue(conn: Conn, group: Group, items: list[tuple[NewJob, datetime]]) -> list[Job]:
    await _insert_jobs(conn, group, [job for job, _ in items])
    return [new_job(job, now) for job, now in items]


async def enqueue_leased(
    conn: Conn, group: Group, items: list[tuple[NewJob, datetime, str, datetime]]
) -> list[Lease | None]:
    leases, rows = [], []
    for job, now, worker, expires in items:
        lease = handed_lease(job, now, worker, expires)
        leases.append(lease)
        rows.append(
            (job.id, job.name, job.payload, job.max_retries, job.created_at, job.available_at,
             now, worker, lease.id, expires, job.priority)
        )  # fmt: skip
    results: list[Lease | None] = []
    for lease, row in zip(leases, rows, strict=True):
        leased = await conn.fetchval(INSERT_LEASED, *row)  # a resume announces the rest
        results.append(lease if leased else None)
    return results


async def enqueue_many(
    conn: Conn, group: Group, items: list[tuple[list[NewJob], datetime]]
) -> list[list[Job]]:
    results = []
    for jobs, now in items:
        await _insert_jobs(conn, group, jobs)
        results.append([new_job(job, now) for job in jobs])
    return results


async def _get(conn: Conn, job_id: str, now: datetime) -> AnyJob | None:
    row = await conn.fetchrow(SELECT_JOB, job_id)
    if row is not None:
        return job_from(row, now)
    row = await conn.fetchrow(SELECT_SUCCEEDED, job_id)
    if row is not None:
        return SucceededJob(*row)
    row = await conn.fetchrow(SELECT_FAILED, job_id)
    return None if row is None else FailedJob(*row)


async def _claim(
    conn: Conn, key: IdempotencyKey, now: datetime, job_ids: str, batch: bool
) -> tuple[str, str] | None:
    """Claim the key for `job_ids`, or return (fingerprint, job ids) of its live earlier use.

    Replicas may race for one key: ON CONFLICT DO NOTHING waits for the other claim to
    commit and then inserts nothing, and the next look finds it.
    """
    table, ids = KEY_TABLES[batch]
    while True:
        used = await conn.fetchrow(
            f"SELECT fingerprint, {ids}, created_at FROM {table} WHERE key = $1 FOR UPDATE",
            key.key,
        )
        if used is not None and used[2] >= key.not_before:
            return used[0], used[1]
        if used is not None:  # expired: the key starts afresh
            await conn.execute(f"DELETE FROM {table} WHERE key = $1", key.key)
        claimed = await conn.fetchval(
            f"INSERT INTO {table} (key, fingerprint, {ids}, created_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (key) DO NOTHING RETURNING key",
            key.key,
            key.fingerprint,
            job_ids,
            now,
        )
        if claimed is not None:
            return None


async def enqueue_once(
    conn: Conn, group: Group, items: list[tuple[NewJob, datetime, IdempotencyKey]]
) -> list[Enqueued]:
    results = []
    for job, now, key in items:
        used = await _claim(conn, key, now, job.id, batch=False)
        if used is None:
            await _insert_jobs(conn, group, [job])
            results.append(Enqueued(new_job(job, now), created=True))
        else:
            same = used[0] == key.fingerprint
            found = await _get(conn, used[1], now)
            results.append(Enqueued(found, created=False, same_request=same))
    return results


async def enqueue_many_once(
    conn: Conn, group: Group, items: list[tuple[list[NewJob], datetime, IdempotencyKey]]
) -> list[EnqueuedBatch]:
    results = []
    for jobs, now, key in items:
        used = await _claim(conn, key, now, ",".join(job.id for job in jobs), batch=True)
        if used is None:
            await _insert_jobs(conn, group, jobs)
            created = [new_job(job, now) for job in jobs]
            results.append(EnqueuedBatch([job.id for job in jobs], list(created), created=True))
        else:
            ids = used[1].split(",")
            found = [await _get(conn, job_id, now) for job_id in ids]
            same = used[0] == key.fingerprint
            results.append(EnqueuedBatch(ids, found, created=False, same_request=same))
    return results


async def reserve(conn: Conn, group: Group, items: list[tuple[Any, ...]]) -> list[list[Lease]]:
    results = []
    for names, worker_id, max_jobs, now, expires_at, max_bytes in items:
        if not group.limited.isdisjoint(names):
            await conn.execute(LOCK_LIMITED, list(names))
            if len(names) == 1 and max_jobs == 1:
                one = [RESERVE_LIMITED_ONE, list(names), now, worker_id, expires_at]
                results.append(leases_from(await conn.fetch(*one), expires_at))
                continue
            limit = NO_LIMIT if max_bytes is None else max_bytes
            rows = await conn.fetch(
                RESERVE_LIMITED, list(names), now, max_jobs, limit, worker_id, expires_at
            )
            results.append(leases_from(rows, expires_at))
            continue
        if len(names) == 1 and max_jobs == 1:
            rows = await conn.fetch(RESERVE_ONE, list(names), now, worker_id, expires_at)
            results.append(leases_from(rows, expires_at))
            continue
        limit = NO_LIMIT if max_bytes is None else max_bytes
        rows = await conn.fetch(RESERVE, list(names), now, max_jobs, limit, worker_id, expires_at)
        results.append(leases_from(rows, expires_at))
    return results


async def ack(
    conn: Conn, group: Group, items: list[tuple[str, str, datetime]]
) -> list[SucceededJob | None]:
    ids, leases, times = (list(column) for column in zip(*items, strict=True))
    freed = f"{group.sender}|{times[0].isoformat()}|"  # `sender|available_at|` + the name
    rows = await conn.fetch(ACK, ids, leases, times, CHANNEL, freed, list(group.limited))
    taken = {(row[0], row[1]): row for row in rows}
    results: list[SucceededJob | None] = []
    for job_id, lease_id, _ in items:
        row = taken.pop((job_id, lease_id), None)  # a repeated item finds it gone
        if row is None:
            results.append(None)
            continue
        id_, _, name, payload, attempts, created_at, available_at, at, leased_at, rank = row[:10]
        done = SucceededJob(
            id_, name, payload, attempts, created_at, available_at, at, rank, *row[10:13]
        )
        done.leased_at = leased_at
        results.append(done)
    return results


async def fail(conn: Conn, group: Group, items: list[tuple[Any, ...]]) -> list[FailOutcome | None]:
    results: list[FailOutcome | None] = []
    for job_id, lease_id, now, exception, decide, expired_before in items:
        if expired_before is None:
            row = await conn.fetchrow(HELD_FOR_FAIL, job_id, lease_id)
        else:
            row = await conn.fetchrow(HELD_EXPIRED, job_id, lease_id, expired_before)
        if row is None:
            results.append(None)
            continue
        job_id, name, payload, attempts, max_retries, created, available, lease_seq = row[:8]
        leased, rank = row[8], row[9]
        schedule = tuple(row[10:13])
        retry_at = decide(attempts, max_retries)
        if retry_at is not None:
            await conn.execute(REQUEUE, retry_at, job_id)
            group.announce(name, retry_at)
            job = [job_id, name, payload, attempts, max_retries, created, retry_at]
            job += [None, None, None, rank, *schedule]  # no longer reserved
            results.append(Retrying(job_from(job, now), leased))
            continue
        await conn.execute(DELETE_JOB, job_id)
        if name in group.limited:
            group.announce(name, now)  # a slot is free
        values = (job_id, name, payload, attempts, max_retries, lease_seq, exception)
        await conn.execute(INSERT_FAILED, *values, created, available, now, rank, *schedule)
        group.buried.append((name, now))
        failed = FailedJob(
            job_id, name, payload, attempts, exception, created, available, now, rank, *schedule
        )
        results.append(Buried(failed, leased))
    return results


async def _count_failed(conn: Conn, buried: list[tuple[str, datetime]]) -> None:
    pairs = per_minute(buried)
    names, minutes = zip(*pairs, strict=True)
    await conn.execute(COUNT_FAILED, list(names), list(minutes), list(pairs.values()))


async def extend(conn: Conn, group: Group, items: list[tuple[str, str, datetime]]) -> list[bool]:
    results = []
    for job_id, lease_id, expires_at in items:
        status = await conn.execute(EXTEND, expires_at, job_id, lease_id)
        results.append(status == "UPDATE 1")
    return results


async def release(
    conn: Conn, group: Group, items: list[tuple[str, str, datetime]]
) -> list[Job | None]:
    results: list[Job | None] = []
    for job_id, lease_id, now in items:
        row = await conn.fetchrow(RELEASE, job_id, lease_id)
        if row is not None:
            group.announce(row[1], row[6])
        results.append(None if row is None else job_from(row, now))
    return results


async def cancel(
    conn: Conn, group: Group, items: list[tuple[str, DeleteScope]]
) -> list[CancelResult]:
    async def one(job_id: str, scope: DeleteScope) -> CancelResult:
        if scope in ("any", "pending"):
            if await conn.execute(CANCEL_PENDING, job_id) != "DELETE 0":
                return "deleted"
            if await conn.fetchval(IS_PENDING, job_id) is not None:
                return "reserved"
        for table, sql in DELETE_FINISHED.items():
            if scope in ("any", table) and await conn.execute(sql, job_id) != "DELETE 0":
                return "deleted"
        return "missing"

    return [await one(job_id, scope) for job_id, scope in items]


async def retry_failed(
    conn: Conn, group: Group, items: list[tuple[str, datetime]]
) -> list[Job | None]:
    results: list[Job | None] = []
    for job_id, now in items:
        row = await conn.fetchrow(TAKE_FAILED, job_id)
        if row is None:
            results.append(None)
            continue
        job_id, name, payload, max_retries, created_at, lease_seq, rank = row[:7]
        schedule = tuple(row[7:10])
        await conn.execute(
            INSERT_JOB, job_id, name, payload, 0, max_retries, created_at, now, lease_seq, rank,
            *schedule,
        )  # fmt: skip
        group.announce(name, now)
        results.append(
            Job(job_id, name, payload, 0, max_retries, created_at, now, None, None, "available",
                None, rank, *schedule)
        )  # fmt: skip
    return results


async def prune(conn: Conn, group: Group, items: list[tuple[str, datetime, int]]) -> list[int]:
    results = []
    for kind, before, limit in items:
        table, key, stamp = PRUNED[kind]
        status = await conn.execute(
            f"DELETE FROM {table} WHERE {key} IN "
            f"(SELECT {key} FROM {table} WHERE {stamp} < $1 ORDER BY {stamp} LIMIT $2)",
            prune_bound(kind, before),
            limit,
        )
        results.append(int(status.split()[-1]))
    return results


async def configure_queue(
    conn: Conn, group: Group, items: list[tuple[str, QueueChange, datetime]]
) -> list[None]:
    for name, change, now in items:
        sql, values = queue_upsert(change, now, "$")
        await conn.execute(sql, name, *values)
        group.announce(name, now)  # other replicas' polls look again, as for new jobs
    return [None] * len(items)


async def put_schedule(conn: Conn, group: Group, items: list[tuple[Schedule, bool]]) -> list[None]:
    for s, retimed in items:
        await conn.execute(
            PUT_SCHEDULE, s.id, s.name, s.payload, s.max_retries, s.priority, s.interval_ms,
            s.cron, s.timezone, s.paused, s.skip_if_running, s.anchor_at, s.next_run_at,
            s.created_at, s.updated_at, retimed,
        )  # fmt: skip
    return [None] * len(items)


async def delete_schedule(conn: Conn, group: Group, items: list[str]) -> list[bool]:
    return [await conn.execute(DELETE_SCHEDULE, some_id) == "DELETE 1" for some_id in items]


async def fire_schedule(
    conn: Conn, group: Group, items: list[tuple[Firing, NewJob]]
) -> list[FireResult]:
    """See Storage.fire_schedule. Replicas may fire one occurrence at once: the guard's row
    lock orders them and the run record's unique key refuses the second enqueue."""
    results: list[FireResult] = []
    for f, job in items:
        row = await conn.fetchrow(ADVANCE_SCHEDULE, f.next_run_at, f.schedule_id, f.expected_next)
        if row is None:
            results.append("stale")
            continue
        running = row[0] is not None and await conn.fetchval(IS_PENDING, row[0]) is not None
        if f.skip_if_running and running:
            skipped = await conn.fetchval(
                INSERT_RUN, f.schedule_id, f.scheduled_for, None, f.catch_up, f.now
            )
            results.append("skipped" if skipped is not None else "duplicate")
            continue
        inserted = await conn.fetchval(
            INSERT_RUN, f.schedule_id, f.scheduled_for, job.id, f.catch_up, f.now
        )
        if inserted is None:
            results.append("duplicate")
            continue
        await _insert_jobs(conn, group, [job], scheduled=True)  # announced at commit
        await conn.execute(RAN, f.scheduled_for, job.id, f.schedule_id)
        results.append(new_job(job, f.now))
    return results


async def probe(conn: Conn, group: Group, items: list[None]) -> list[None]:
    await conn.execute("SET TRANSACTION READ WRITE")  # fails on a read-only standby
    return [None for _ in items]


# Writes a crash of the database may undo without breaking a promise (see _connection).
VOLATILE = frozenset({"reserve", "extend", "release", "probe"})

# Kinds whose handler sends exactly one statement for one item, and announces nothing or
# announces in that statement (an ack of a limited name).
ONE_STATEMENT = frozenset({"reserve", "ack", "extend", "enqueue_leased"})


async def _close_quietly(conn: Conn) -> None:
    """Close a connection that may be dead already, within 2 s."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await conn.close()


def _one_statement(op: Op, limited: frozenset[str]) -> bool:
    """Whether `op` alone needs no transaction: not a reserve of limited names, which
    locks their rows first and must hold the lock to its commit."""
    if op.kind == "reserve":
        return limited.isdisjoint(op.arg[0])
    return op.kind in ONE_STATEMENT


Handler = Callable[[Conn, Group, list[Any]], Awaitable[list[Any]]]
HANDLERS: dict[str, Handler] = {
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


class PostgresStorage(SqlStorage):
    shared = True

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        self._sender = os.urandom(6).hex()  # to skip this replica's own notifications
        self._listener: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # the listener's loop ends on it, not on a cancel alone
        self._lost: asyncio.Event | None = None  # set when the LISTEN link drops, or to stop
        self.listening = asyncio.Event()  # set once LISTEN is up (tests wait for it)
        # The LISTEN connection also sends the relay's messages; one statement at a time.
        self._link: asyncpg.Connection | None = None
        self._link_lock = asyncio.Lock()
        self._conns: dict[bool, Conn] = {}  # the writer's: durable (False), volatile (True)
        # Names with a concurrency or rate limit, as far as this replica has seen: their
        # reserves lock (see LOCK_LIMITED). One missing here is never leased past its
        # limit (the plain reserve skips limited names); it is only found a moment later.
        self.limited: frozenset[str] = frozenset()  # replaced, never changed in place
        self._writer = Writer(self._apply)

    async def migrate(self) -> None:
        async with self._read() as conn, conn.begin():
            await conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            await conn.run_sync(migrate.upgrade)
        await self.queue_settings()  # which names are limited

    async def queue_settings(self, name: str | None = None) -> dict[str, QueueSettings]:
        settings = await super().queue_settings(name)
        if name is None:
            self.limited = frozenset(n for n, found in settings.items() if found.limited)
        return settings

    async def queue_holds(self, names: Sequence[str], now: datetime) -> dict[str, Hold]:
        """As for every backend; and a name this replica did not know to be limited (so
        its reserve just skipped it) is to be looked at again at once, now that it does."""
        known = self.limited.intersection(names)
        holds = await super().queue_holds(names, now)
        for name in self.limited.intersection(names) - known:
            holds.setdefault(name, Hold(now))
        return holds

    def _saw_settings(self, names: Sequence[str], settings: dict[str, QueueSettings]) -> None:
        seen = {name for name in names if (found := settings.get(name)) and found.limited}
        if seen != self.limited.intersection(names):
            self.limited = self.limited.difference(names) | seen

    async def configure_queue(self, name: str, change: QueueChange, now: datetime) -> None:
        await super().configure_queue(name, change, now)
        await self.queue_settings()  # this replica knows at once which names are limited

    async def close(self) -> None:
        """Stop the listener, then the writer. The listener is told to stop, not only
        cancelled: on Python 3.11 a cancel that lands as its wait ends can be lost."""
        self._closing.set()
        if self._lost is not None:
            self._lost.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await super().close()
        for conn in self._conns.values():
            await _close_quietly(conn)
        self._conns.clear()

    # -- the writer ---------------------------------------------------------------------

    async def _apply_group(self, group: list[Op]) -> list[Any]:
        volatile = all(op.kind in VOLATILE for op in group)
        limited = self.limited  # the set as it is when this group starts
        try:
            conn = await self._connection(volatile)
            if len(group) == 1 and _one_statement(group[0], limited):
                # One statement is atomic by itself: no BEGIN and COMMIT round trips.
                op = group[0]
                return await HANDLERS[op.kind](conn, Group(self._sender, limited), [op.arg])
            if len(group) == 1 and group[0].kind == "enqueue":
                job, now = group[0].arg
                ready = Group()
                ready.announce(job.name, job.available_at)
                columns = [[value] for value in _row(job)]
                await conn.execute(ENQUEUE_ONE, *columns, CHANNEL, *self._payloads(ready))
                return [new_job(job, now)]
            async with conn.transaction():
                ready = Group(self._sender, limited)
                results: list[Any] = []
                for kind, run in runs(group):
                    results.extend(await HANDLERS[kind](conn, ready, [op.arg for op in run]))
                if ready.buried:
                    await _count_failed(conn, ready.buried)
                if ready.ready:
                    await conn.execute(NOTIFY, CHANNEL, self._payloads(ready))
            return results
        except OUTAGES as exc:
            for conn in self._conns.values():
                if not conn.is_closed():
                    conn.terminate()
            self._conns.clear()
            raise StorageUnavailable(f"database unavailable: {exc}") from exc

    async def _connection(self, volatile: bool) -> Conn:
        """The writer's connection for durable groups, or the one for groups a crash may
        undo harmlessly (leases, extends, releases: the job just comes back, as after an
        expiry), whose commits do not wait for the disk (synchronous_commit off). The
        writer runs one group at a time, so either way they apply in order."""
        conn = self._conns.get(volatile)
        if conn is None or conn.is_closed():
            settings = {"synchronous_commit": "off"} if volatile else {}
            conn = self._conns[volatile] = await asyncpg.connect(
                self._dsn, server_settings=settings
            )
        return conn

    # -- cross-replica wake-ups ---------------------------------------------------------

    def _payloads(self, group: Group) -> list[str]:
        """`sender|available_at|name`: the format every release since 1.0 sends and reads."""
        return [f"{self._sender}|{at.isoformat()}|{name}" for name, at in group.ready.items()]

    async def listen(
        self,
        on_ready: Callable[[str, datetime], None],
        on_gap: Callable[[], None],
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._listener = asyncio.create_task(self._listen_forever(on_ready, on_gap, on_event))

    async def broadcast(self, payloads: list[str]) -> None:
        """NOTIFY on the events channel, from the LISTEN connection (not the writer's, so
        a slow dashboard never delays a commit). Lost if that link is down right now."""
        if self._link is None:
            raise StorageUnavailable("the LISTEN connection is down")
        link = self._link
        async with self._link_lock:
            # Bounded: a send hanging on a dead link must not hold the lock the
            # keepalive needs to find out the link is dead.
            async with asyncio.timeout(KEEPALIVE_S):
                await link.execute(NOTIFY, EVENTS_CHANNEL, payloads)

    async def _listen_forever(
        self,
        on_ready: Callable[[str, datetime], None],
        on_gap: Callable[[], None],
        on_event: Callable[[str], None] | None,
    ) -> None:
        """Hold one LISTEN connection; reconnect when it drops.

        Notifications sent while it was down are lost, so after every reconnect all
        waiters are woken to look at the database themselves (`on_gap`).
        """
        delay = 0.1
        while not self._closing.is_set():
            try:
                async with self._listening(on_ready, on_event) as (conn, lost):
                    delay = 0.1
                    on_gap()
                    self.listening.set()
                    await self._keep_alive(conn, lost)
            except Exception as exc:  # any failure of the link: a new connection
                if self._closing.is_set():
                    return
                log.warning("LISTEN connection failed (%r); retrying in %.1f s", exc, delay)
            await self._pause(delay)
            delay = min(delay * 2, 5.0)

    async def _keep_alive(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Until the link drops (or close() says so): after each quiet KEEPALIVE_S, a
        `SELECT 1` to find out whether the link is still alive."""
        while not lost.is_set():
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    await lost.wait()
            except TimeoutError:
                async with self._link_lock, asyncio.timeout(KEEPALIVE_S):
                    await conn.fetchval("SELECT 1")

    async def _pause(self, seconds: float) -> None:
        """Sleep before reconnecting, cut short by close()."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    @asynccontextmanager
    async def _listening(
        self, on_ready: Callable[[str, datetime], None], on_event: Callable[[str], None] | None
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncio.Event]]:
        def received(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            sender, at, name = payload.split("|", 2)
            if sender != self._sender:
                on_ready(name, datetime.fromisoformat(at))

        settings = {"application_name": "bgjobs listener"}  # to find it in pg_stat_activity
        conn = await asyncpg.connect(self._dsn, server_settings=settings)
        lost = self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        if self._closing.is_set():  # close() came while this connected
            lost.set()

        def event(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            assert on_event is not None
            on_event(payload)

        try:
            await conn.add_listener(CHANNEL, received)
            if on_event is not None:
                await conn.add_listener(EVENTS_CHANNEL, event)
            self._link = conn
            yield conn, lost
        finally:
            self._link = None
            await _close_quietly(conn)
