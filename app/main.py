"""Wires settings, storage, notifier, service and routes into the ASGI app `app.main:app`."""

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import (
    auth,
    bulk,
    errors,
    events,
    health,
    jobs,
    leases,
    observability,
    queues,
    schedules,
)
from app.api.auth import parse_tokens
from app.api.body import with_documented_bodies
from app.api.fastlane import FastLane
from app.api.guard import Guard
from app.api.metrics import Metrics
from app.api.observe import Observe
from app.logs import ensure_logging
from app.queue.clock import Clock, SystemClock
from app.queue.notifier import Notifier
from app.queue.relay import EventRelay
from app.queue.service import Limits, QueueService, repeat
from app.settings import Settings, server_info
from app.shutdown import on_stop_signal
from app.storage import ensure_schema, open_storage
from app.ui import mount as mount_dashboard

ROUTERS = (
    bulk.router,
    jobs.router,
    leases.router,
    health.router,
    observability.router,
    auth.router,
    events.router,
    queues.router,
    schedules.router,
)

DESCRIPTION = """\
An HTTP job queue. Producers enqueue jobs with `POST /jobs`; workers long-poll
`POST /leases` to reserve them, then ack, fail, extend or release each lease; dashboards
list pending, succeeded and failed jobs.

Timestamps in responses are UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ`; timestamps in requests
are RFC 3339 with an offset. Durations are integer milliseconds (`*_ms`). Errors are JSON
with a human-readable `detail`.
"""


def _operation_id(route: APIRoute) -> str:
    """Stable operation ids: generated clients name their functions after them."""
    return route.operation_id or route.name


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections under load.

    Everything built at start lives as long as the process: frozen, it is never scanned
    again (profiled: a quarter of a request's CPU went to collections over it). What a
    full collection still scans grows with the open requests: 1,000 parked long polls are
    about 100,000 objects, and a full collection then took 60-75 ms; at Python's default
    thresholds one ran every 13,000 jobs of batch enqueue, which fell from 50,000-58,000
    to 34,000-42,000 jobs/s. A first generation of 10,000 objects (not 700) makes every
    kind of collection about twenty times rarer; nearly all objects a request makes are
    freed by reference counting long before that."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the database is opened at start-up, never at import."""
    settings = settings or Settings()
    clock = clock or SystemClock()
    metrics = Metrics(settings.metrics_max_names)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_logging(settings)
        storage = open_storage(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.db_pool_size,
        )
        await ensure_schema(storage, settings.auto_migrate)
        notifier = Notifier(clock, storage.earliest, settings.poll_recheck_ms / 1000)
        limits = Limits(
            max_payload_bytes=settings.max_payload_bytes,
            retry_base_ms=settings.retry_base_ms,
            retry_max_ms=settings.retry_max_ms,
            max_waiting_polls=settings.max_waiting_polls,
            max_event_streams=settings.max_event_streams,
            max_response_bytes=settings.max_response_bytes,
            retain_succeeded_hours=settings.retain_succeeded_hours,
            retain_failed_hours=settings.retain_failed_hours,
            idempotency_window_hours=settings.idempotency_window_hours,
        )
        service = QueueService(storage, notifier, clock, limits, observer=metrics)
        app.state.service = service
        metrics.waiting = lambda: service.waiting
        relay = EventRelay(service.hub, storage.broadcast) if storage.shared else None

        def gap() -> None:  # news from other replicas may have been lost
            notifier.wake_all()
            if relay is not None:
                relay.gap()

        await storage.listen(
            service.job_ready_elsewhere, gap, relay.received if relay is not None else None
        )
        maintenance = [
            asyncio.create_task(
                repeat(settings.reaper_interval_ms / 1000, service.reap_expired, "reaping")
            ),
            asyncio.create_task(
                repeat(settings.prune_interval_s, service.prune_history, "pruning history")
            ),
            asyncio.create_task(
                repeat(settings.scheduler_interval_ms / 1000, service.schedules.tick, "scheduling")
            ),
        ]
        undo_signals = on_stop_signal(service.stop_waiting)
        tune_garbage_collector()
        try:
            yield
        finally:
            undo_signals()
            for task in maintenance:
                task.cancel()
            await asyncio.gather(*maintenance, return_exceptions=True)
            notifier.close()
            if relay is not None:
                relay.close()
            await storage.close()

    app = FastAPI(
        title="bgjobs-server",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.tokens = parse_tokens(settings.api_tokens, settings.api_tokens_file)
    app.state.metrics = metrics
    app.state.server_info = server_info(settings)
    errors.install(app)
    app.add_middleware(FastLane)  # inside Guard: the hot routes' bodies are bounded too
    # Before any body is read: no body over the size limit, no web page posting a form or
    # text body, nor reaching an open server from another origin or a rebound DNS name.
    app.add_middleware(
        Guard,
        max_bytes=settings.max_request_bytes,
        open_server=not app.state.tokens,
        allowed_hosts=settings.allowed_hosts,
    )
    # Outermost: times and tags every request, refused ones included.
    app.add_middleware(Observe, metrics=metrics, access_log=settings.access_log)
    for router in ROUTERS:
        app.include_router(router)
    mount_dashboard(app)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_documented_bodies(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


app = create_app()
