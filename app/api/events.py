"""GET /events: a server-sent event stream of job changes, for dashboards.

Raw ASGI underneath, so that a slow reader is noticed (a send that does not finish in
SEND_TIMEOUT_S ends the stream) and a hung-up client is seen at once. Above
COALESCE_ABOVE changes in one flush, they go as a single `coalesced` event with counts.
"""

import asyncio
import contextlib
from collections import Counter
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from starlette.types import Receive, Scope, Send

from app.api.auth import require
from app.api.errors import responses
from app.api.observability import _name_stats
from app.api.schemas import format_timestamp
from app.queue.errors import Unauthenticated
from app.queue.events import Event, EventHub, Subscriber
from app.queue.service import QueueService

router = APIRouter(tags=["events"])

STATS_EVERY_S = 5.0  # a `stats` event this often, which doubles as the keep-alive
SEND_TIMEOUT_S = 10.0  # a reader that takes longer to accept one flush is dropped
COALESCE_ABOVE = 100  # more changes than this in one flush go as one `coalesced` event
FLUSH_S = 0.05  # changes are gathered this long before a flush

EXAMPLE = (
    'id: 5f3a9c21-42\nevent: job\ndata: {"id":"019ac5a1b2c3d4e5f6a7b8c9d0e1f2a3",'
    '"name":"send_email","change":"succeeded","state":"succeeded",'
    '"at":"2026-11-28T15:04:05.123456Z"}\n\n'
)


def frame(kind: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return (
        f"{head}event: {kind}\ndata: ".encode()
        + orjson.dumps(data, default=_time, option=orjson.OPT_PASSTHROUGH_DATETIME)
        + b"\n\n"
    )


def _time(value: object) -> str:
    if isinstance(value, datetime):
        return format_timestamp(value)
    raise TypeError(type(value).__name__)


class EventStream(Response):
    """The ASGI response: headers, then flushes until the client leaves, the subscriber is
    dropped, or the server stops."""

    def __init__(self, service: QueueService, subscriber: Subscriber, name: str | None) -> None:
        super().__init__(media_type="text/event-stream")
        self.service = service
        self.hub: EventHub = service.hub
        self.subscriber = subscriber
        self.name = name
        self.gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await self._send(send, b"retry: 2000\n\n")
            await self._pump(send)
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError):
            pass  # a slow or vanished reader: the connection is closed under it
        finally:
            watcher.cancel()
            self.hub.unsubscribe(self.subscriber)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.subscriber.wake.set()

    async def _pump(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        next_stats = loop.time()
        while not (self.gone or self.subscriber.dropped or self.hub.closed.is_set()):
            if not self.subscriber.queue:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(next_stats):
                        await self.subscriber.wake.wait()
                await asyncio.sleep(FLUSH_S)  # let a burst gather into one flush
            if self.gone or self.subscriber.dropped or self.hub.closed.is_set():
                return
            chunks = self._frames(self.subscriber.take())
            if loop.time() >= next_stats:
                chunks.append(await self._stats())
                next_stats = loop.time() + STATS_EVERY_S
            if chunks:
                await self._send(send, b"".join(chunks))

    def _frames(self, events: list[Event]) -> list[bytes]:
        if len(events) > COALESCE_ABOVE:
            changes: Counter[str] = Counter()
            for e in events:
                if e.kind == "coalesced":  # a burst on another replica, already counted
                    changes.update(e.data["changes"])
                else:
                    changes[e.data.get("change", e.kind)] += 1
            data = {"count": sum(changes.values()), "changes": dict(changes)}
            return [frame("coalesced", data, self.hub.event_id(events[-1].seq))]
        return [frame(e.kind, e.data, self.hub.event_id(e.seq)) for e in events]

    async def _stats(self) -> bytes:
        stats = await self.service.stats(self.name, None)
        return frame("stats", _name_stats(stats.totals))

    @staticmethod
    async def _send(send: Send, body: bytes) -> None:
        message = {"type": "http.response.body", "body": body, "more_body": True}
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await send(message)


@router.get(
    "/events",
    operation_id="stream_events",
    dependencies=[require("read")],
    summary="A live stream of job changes (server-sent events)",
    responses={
        200: {
            "description": "`text/event-stream`. `event: job` per change (`data`: id, name, "
            "change, state, at), `event: coalesced` (`count`, `changes`, and `name` when "
            "the burst was relayed from another replica) for a burst, "
            "`event: stats` every 5 s (the totals of GET /stats), `event: reset` when a "
            "resumed stream missed more than the server kept: reload.",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": EXAMPLE}},
        },
        **responses(),
    },
)
async def stream_events(
    request: Request,
    name: Annotated[
        str | None,
        Query(pattern=r"^[A-Za-z0-9_.:\-]{1,255}$", description="Only changes of this name."),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=64,
            description="The `id` of the last event received: the stream resumes after it "
            "(within the recent events the server keeps), or starts with `reset`.",
        ),
    ] = None,
) -> Response:
    """Changes as they happen: enqueued, leased, succeeded, failed, retrying, expired,
    released, retried, deleted. Bounded: past `BGJOBS_MAX_EVENT_STREAMS` streams a 503,
    and a reader that falls behind is dropped (reconnect with `Last-Event-ID`). Tokens go
    in the `Authorization` header, never in the query string."""
    if any(key in request.query_params for key in ("token", "access_token")):
        raise Unauthenticated("tokens in query strings are refused: send Authorization: Bearer")
    service: QueueService = request.app.state.service
    subscriber = service.hub.subscribe(name, last_event_id)
    return EventStream(service, subscriber, name)
