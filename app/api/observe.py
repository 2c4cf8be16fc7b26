"""Every request, timed and tagged: a request id (the client's `X-Request-ID` when it is
printable and at most 200 characters, else a new one) sent back on the response, the
duration histogram by route template, and one access log line when enabled."""

import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.metrics import Metrics

access = logging.getLogger("bgjobs.access")
HEADER = b"x-request-id"
MAX_ID = 200


def request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == HEADER:
            if 0 < len(value) <= MAX_ID and all(0x20 <= b < 0x7F for b in value):
                given: str = value.decode("ascii")
                return given
            break
    return os.urandom(8).hex()


def route_of(scope: Scope) -> str:
    """The route template (`/leases/{lease_id}/ack`), never the raw path: raw paths
    carry ids, and labels must stay few."""
    template = scope.get("bgjobs.route")  # set by the fast lane
    if template is not None:
        return str(template)
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        header = (b"x-request-id", rid.encode("ascii"))
        status = 500  # if the app dies before answering, the server answers 500

        async def send_tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_tagged)
        finally:
            self._done(scope, rid, status, time.perf_counter() - started)

    def _done(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        route = route_of(scope)
        self.metrics.request(scope["method"], route, status, seconds)
        if self.access_log:
            duration_ms = round(seconds * 1000, 3)
            fields: dict[str, Any] = {
                "request_id": rid,
                "method": scope["method"],
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
            }
            access.info(
                "%s %s %d %.3f ms [%s]",
                scope["method"], route, status, duration_ms, rid, extra=fields,
            )  # fmt: skip
