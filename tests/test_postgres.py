"""What only PostgreSQL does: plans with SKIP LOCKED, time zones, LISTEN/NOTIFY wake-ups
between replicas, and a LISTEN connection that comes back after it drops."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.main import create_app
from app.queue.service import QueueService
from app.settings import Settings
from app.storage.postgres import RESERVE, RESERVE_LIMITED, RESERVE_LIMITED_ONE, RESERVE_ONE
from tests.conftest import enqueue, lease


@pytest.fixture
def backend() -> str:
    return "postgres"


def engine_of(service: QueueService) -> AsyncEngine:
    engine: AsyncEngine = service.storage.engine  # type: ignore[attr-defined]
    return engine


async def explain(service: QueueService, call: Callable[[], Awaitable[Any]]) -> str:
    """EXPLAIN the statement `call` sends, with the parameters it sends."""
    sent: list[tuple[str, Any]] = []

    me = asyncio.current_task()

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if asyncio.current_task() is me:  # not the reaper's queries
            sent.append((statement, params))

    engine = engine_of(service)
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    statement, params = sent[-1]
    return await plan_of(service, statement, tuple(params))


async def plan_of(service: QueueService, statement: str, params: tuple[Any, ...]) -> str:
    """EXPLAIN a hot-path statement as the writer sends it, with these parameters."""
    async with engine_of(service).connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        rows = await raw.fetch(f"EXPLAIN {statement}", *params)
        await conn.rollback()
    return "\n".join(row[0] for row in rows)


async def fill(service: QueueService, count: int, names: tuple[str, ...] = ("a", "b")) -> None:
    """A backlog big enough that the planner prefers indexes, as it will in production."""
    async with engine_of(service).begin() as conn:
        for name in names:
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, "
                    "available_at, lease_seq) SELECT :name || g, :name, 'p', 0, 3, now(), "
                    "now() - make_interval(secs => g), 0 FROM generate_series(1, :n) g"
                ),
                {"name": name, "n": count},
            )
        await conn.execute(text("ANALYZE jobs"))


async def test_reserve_locks_with_skip_locked_through_the_ready_index(
    service: QueueService,
) -> None:
    """Reserve runs on the writer's own connection: explain the very statement it sends."""
    await fill(service, 20_000)
    now = service.clock.now()
    params = (["a", "b"], now, 5, 1 << 20, "w", now + timedelta(seconds=30))
    plan = await plan_of(service, RESERVE, params)
    # One bounded range of the ready index per name (a nested loop over the names).
    assert "Index Scan using ix_jobs_ready_priority" in plan and "unnest" in plan, plan
    assert "LockRows" in plan and "CTE picked" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


async def test_single_job_reserve_locks_with_skip_locked_through_the_ready_index(
    service: QueueService,
) -> None:
    """The one-name, one-job reserve (the common worker) has its own, simpler statement.
    For a name with few ready jobs among many of other names (where a scan in time order
    would cost the whole backlog) it takes the name's range of the ready index."""
    await fill(service, 20_000)
    await fill(service, 10, names=("rare",))
    now = service.clock.now()
    params = (["rare"], now, "w", now + timedelta(seconds=30))
    plan = await plan_of(service, RESERVE_ONE, params)
    assert "ix_jobs_ready_priority" in plan and "LockRows" in plan and "InitPlan" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


async def test_limited_reserves_take_one_range_of_the_ready_index_per_name(
    service: QueueService,
) -> None:
    """The reserves of limited names (a concurrency limit and a rate limit here) read the
    name's settings and kept count by key, then one bounded range per name, as the
    others do."""
    await fill(service, 20_000)
    async with engine_of(service).begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO queues (name, paused, updated_at, concurrency_limit, rate_count, "
                "rate_per_ms, tokens, tokens_at) VALUES ('a', false, now(), 5, NULL, NULL, "
                "NULL, NULL), ('b', false, now(), NULL, 10, 1000, 1.0, now())"
            )
        )
    now = service.clock.now()
    expires = now + timedelta(seconds=30)
    for statement, params in (
        (RESERVE_LIMITED, (["a", "b"], now, 5, 1 << 20, "w", expires)),
        (RESERVE_LIMITED_ONE, (["a"], now, "w", expires)),
    ):
        plan = await plan_of(service, statement, params)
        assert "Index Scan using ix_jobs_ready_priority" in plan and "LockRows" in plan, plan
        assert "Seq Scan on jobs" not in plan, plan


async def test_reserve_of_a_dominant_name_behind_older_jobs_takes_the_ready_index(
    service: QueueService,
) -> None:
    """One name holds most of the backlog, and another name's jobs are all older. With
    the statistics ANALYZE gives then, the planner preferred to walk `ix_jobs_available_at`
    in time order and filter by name: past every older job, at each reserve (26 ms at
    460,000 jobs, measured by the bench). Both reserve statements must take the name's
    range of the ready index."""
    async with engine_of(service).begin() as conn:
        for name, count, hours in (("older", 20_000, 2), ("dominant", 100_000, 1)):
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, name, payload, attempts, max_retries, created_at, "
                    "available_at, lease_seq) SELECT :name || g, :name, 'p', 0, 3, now(), "
                    "now() - make_interval(hours => :hours) + make_interval(secs => g / 100.0), "
                    "0 FROM generate_series(1, :n) g"
                ),
                {"name": name, "n": count, "hours": hours},
            )
        await conn.execute(text("ANALYZE jobs"))
    now = service.clock.now()
    expires = now + timedelta(seconds=30)
    for statement, params in (
        (RESERVE, (["dominant"], now, 100, 1 << 20, "w", expires)),
        (RESERVE_ONE, (["dominant"], now, "w", expires)),
        (RESERVE_LIMITED, (["dominant"], now, 100, 1 << 20, "w", expires)),
        (RESERVE_LIMITED_ONE, (["dominant"], now, "w", expires)),
    ):
        plan = await plan_of(service, statement, params)
        assert "ix_jobs_ready_priority" in plan and "ix_jobs_available_at" not in plan, plan


async def test_reaper_and_history_use_indexes(service: QueueService) -> None:
    await fill(service, 20_000)
    now = service.clock.now()
    plan = await explain(service, lambda: service.storage.expired_leases(now, 100))
    assert "ix_jobs_lease_expiry" in plan, plan
    # The due-time lookup is for names whose polls wait, so names with nothing ready.
    plan = await explain(service, lambda: service.storage.earliest("idle"))
    assert "ix_jobs_ready" in plan, plan


async def test_timestamps_are_stored_with_time_zone(service: QueueService) -> None:
    async with engine_of(service).connect() as conn:
        types = (
            (
                await conn.execute(
                    text(
                        "SELECT DISTINCT data_type FROM information_schema.columns "
                        "WHERE table_name IN ('jobs', 'succeeded_jobs', 'failed_jobs') "
                        "AND column_name LIKE '%\\_at'"
                    )
                )
            )
            .scalars()
            .all()
        )
    assert types == ["timestamp with time zone"]


@asynccontextmanager
async def replica(db_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A second server on the same database, in this process but sharing nothing with it."""
    app = create_app(Settings(database_url=db_url, **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            yield client


async def wake_latency(waiter: httpx.AsyncClient, producer: httpx.AsyncClient) -> float:
    waiting = asyncio.create_task(lease(waiter, wait_ms=10_000))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    job = await enqueue(producer)
    leases = await asyncio.wait_for(waiting, 10)
    assert [entry["job"]["id"] for entry in leases] == [job["id"]]
    return time.monotonic() - started


async def test_enqueue_on_one_replica_wakes_a_long_poll_on_another(db_url: str) -> None:
    async with (
        replica(db_url, poll_recheck_ms=5000) as one,
        replica(db_url, poll_recheck_ms=5000) as two,
    ):
        latencies = [await wake_latency(one, two) for _ in range(5)]
    assert max(latencies) < 0.5, latencies  # NOTIFY, not the 5 s re-check


async def kill_listeners(db_url: str) -> int:
    """Terminate every bgjobs LISTEN connection to this database, as a failover would."""
    conn = await asyncpg.connect(
        make_url(db_url).set(drivername="postgresql").render_as_string(False)
    )
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'bgjobs listener' AND datname = current_database()"
        )
    finally:
        await conn.close()
    return killed


async def test_listen_connection_comes_back_after_it_drops(db_url: str) -> None:
    async with (
        replica(db_url, poll_recheck_ms=5000) as one,
        replica(db_url, poll_recheck_ms=5000) as two,
    ):
        await wake_latency(one, two)
        assert await kill_listeners(db_url) == 2
        await asyncio.sleep(0.6)  # the listeners reconnect after 0.1 s
        assert await wake_latency(one, two) < 0.5
        assert await wake_latency(two, one) < 0.5


async def test_a_link_that_drops_as_the_server_stops_ends_the_listener(db_url: str) -> None:
    """The link's drop and the shutdown in the same instant: on Python 3.11 the cancel
    alone can be lost there (the listener would reconnect and the shutdown hang)."""
    for _ in range(10):
        app = create_app(Settings(database_url=db_url))
        async with app.router.lifespan_context(app):
            storage = app.state.service.storage
            await storage.listening.wait()
            storage._lost.set()  # what the connection's termination callback does
            async with asyncio.timeout(1):  # it takes milliseconds
                await storage.close()
            assert storage._listener.done()


async def test_a_server_stops_at_once_while_its_listener_reconnects(db_url: str) -> None:
    """Shutdown at any moment of a reconnect (link just dropped, waiting to retry,
    connecting, LISTENing) ends the listener; it does not retry on, nor hang."""
    for attempt in range(20):
        app = create_app(Settings(database_url=db_url))
        async with asyncio.timeout(5):
            async with app.router.lifespan_context(app):
                storage = app.state.service.storage
                await storage.listening.wait()
                assert await kill_listeners(db_url) == 1
                await asyncio.sleep(attempt * 0.01)  # 0 to 0.19 s: the retry is at 0.1 s
        assert storage._listener.done(), f"the listener outlived its server ({attempt})"
