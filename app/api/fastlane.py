"""The hot routes, taken straight to their endpoints.

Enqueue, lease and ack are most of a queue's traffic, and for them FastAPI's per-request
machinery (exception middleware, routing, dependency solving, the request/response
wrappers) cost more CPU than the work itself: py-spy put two thirds of an enqueue's CPU
there. This middleware sits inside the server-error handler (so a bug is still a logged
500) and hands those few routes, matched on method and path, to the very endpoint
functions FastAPI has registered for them; errors go through the app's own exception
handlers, so answers and the OpenAPI spec are exactly those of the routes. Everything
else goes on to FastAPI.
"""

from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import jobs, leases

Endpoint = Callable[[Request], Awaitable[Response]]

EXACT: dict[tuple[str, str], Endpoint] = {
    ("POST", "/jobs"): jobs.enqueue_job,
    ("POST", "/jobs/batch"): jobs.enqueue_jobs,
    ("POST", "/leases"): leases.lease_jobs,
    ("POST", "/leases/ack"): leases.ack_leases,
}


async def _ack(request: Request) -> Response:
    return await leases.ack_lease(request.path_params["lease_id"], request)


ACK_TEMPLATE = "/leases/{lease_id}/ack"


def match(method: str, path: str) -> tuple[Endpoint, dict[str, str], str] | None:
    """The endpoint for a hot route, its path parameters and its route template (for
    metrics and logs); None for any other."""
    endpoint = EXACT.get((method, path))
    if endpoint is not None:
        return endpoint, {}, path
    if method == "POST" and path.startswith("/leases/") and path.endswith("/ack"):
        lease_id = path[len("/leases/") : -len("/ack")]
        if lease_id and "/" not in lease_id:
            return _ack, {"lease_id": lease_id}, ACK_TEMPLATE
    return None


class FastLane:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = match(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        endpoint, scope["path_params"], scope["bgjobs.route"] = found
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = _handler(request, exc)
            if handler is None:
                raise  # the server-error handler outside answers 500 and logs it
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler(
    request: Request, exc: Exception
) -> Callable[[Request, Exception], Awaitable[Response]] | None:
    """The app's exception handler for `exc`, as FastAPI would pick it (by class)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            handler: Callable[[Request, Exception], Awaitable[Response]] = handlers[cls]
            return handler
    return None
