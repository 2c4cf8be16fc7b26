"""Refuse what must not reach a route, before any body is read.

Size: a declared `Content-Length` over `BGJOBS_MAX_REQUEST_BYTES` is a 413 at once; a
chunked body is counted as it streams in and cut off at the limit.

A page on any site can make the browser send "simple" cross-site requests (form posts,
`fetch` with a text body) to a server on loopback, and a DNS-rebinding page can even read
the answers. Tokens stop both; an open server (no tokens) relies on this middleware:

- a request body must be JSON (`Content-Type: application/json` or `application/*+json`,
  or none at all, as FastAPI reads it): anything else is a 415, so a form or a
  `text/plain` post never reaches a route. Requests without a body (`curl -X POST
  $URL/leases/ID/ack`) are untouched;
- open servers only: an `Origin` other than the server's own is a 403 (cross-site), and
  a `Host` that does not name the server (the address it answers on, loopback names, or
  `BGJOBS_ALLOWED_HOSTS`) is a 403 (DNS rebinding: the page's origin names the attacker's
  domain, so the browser sends that in `Host`).

Every enqueue, lease and ack passes here, so all checks share one pass over the raw ASGI
headers with byte comparisons, in one middleware layer (a layer of its own per check cost
a measurable share of a single enqueue).
"""

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = (b"localhost", b"127.0.0.1", b"[::1]")
NOT_JSON = (
    "request bodies must be JSON: send Content-Type: application/json (a form or text "
    "body is refused, so that no web page can post one here)"
)
CROSS_SITE = (
    "cross-site request refused: this server has no API tokens, so it only answers pages "
    "served from its own origin (configure BGJOBS_API_TOKENS to allow others)"
)
FOREIGN_HOST = (
    "Host header {host!r} does not name this server: an open server answers only for its "
    "own address, localhost, 127.0.0.1 and [::1] (add names to BGJOBS_ALLOWED_HOSTS)"
)


def host_names(extra: str) -> frozenset[bytes]:
    """The loopback names plus `BGJOBS_ALLOWED_HOSTS` (comma-separated), lower-case."""
    names = {name.strip().lower().encode() for name in extra.split(",") if name.strip()}
    return frozenset(names | set(LOOPBACK_NAMES))


def is_json(content_type: bytes) -> bool:
    """application/json or application/*+json, parameters (charset) allowed."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (
        kind.startswith(b"application/") and kind.endswith(b"+json")
    )


def host_name(host: bytes) -> bytes:
    """`Host` without its port: `[::1]:8000` -> `[::1]`, `localhost:8000` -> `localhost`."""
    if host.startswith(b"["):
        return host.split(b"]", 1)[0].lower() + b"]"
    return host.split(b":", 1)[0].lower()


def server_name(scope: Scope) -> bytes | None:
    """The address the connection came in on, as a `Host` would spell it."""
    server = scope.get("server")
    if not server or not server[0]:
        return None
    address = str(server[0]).lower()
    return (f"[{address}]" if ":" in address else address).encode()


class BodyTooLarge(Exception):
    """Raised while reading a chunked body that grew past the limit."""


class Guard:
    """ASGI middleware: the 413 and the 415 always; the 403s on open servers."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, open_server: bool, allowed_hosts: str = ""
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = f"request body is over the {max_bytes}-byte limit"
        self.open_server = open_server
        self.hosts = host_names(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal, chunked = self.refusal(scope)
        if refusal is not None:
            await _refuse(send, *refusal)
        elif chunked:
            await self.app(scope, self.counted(receive), send)
        else:  # uvicorn never hands over more than the declared Content-Length
            await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[tuple[int, str] | None, bool]:
        """(status, detail) when the request must not go on, else None; and whether its
        body is chunked (of unknown length, so counted as it arrives)."""
        content_type = origin = host = None
        has_body = chunked = False
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                has_body = value not in (b"0", b"")
                if value.isdigit() and int(value) > self.max_bytes:
                    return (413, self.too_large), False
            elif key == b"transfer-encoding":
                has_body = chunked = True
            elif key == b"origin":
                origin = value
            elif key == b"host":
                host = value
        if has_body and content_type is not None and not is_json(content_type):
            return (415, NOT_JSON), chunked
        if not self.open_server:
            return None, chunked
        return self.foreign(scope, host, origin), chunked

    def counted(self, receive: Receive) -> Receive:
        """`receive`, raising BodyTooLarge (answered 413) once the body passes the limit."""
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.too_large)
            return message

        return counting

    def foreign(
        self, scope: Scope, host: bytes | None, origin: bytes | None
    ) -> tuple[int, str] | None:
        """The open server's 403s: a `Host` that is not this server, an `Origin` from
        elsewhere. No `Host` at all (HTTP/1.0) is no browser's, so it may pass."""
        if host is not None:
            name = host_name(host)
            if name not in self.hosts and name != server_name(scope):
                return 403, FOREIGN_HOST.format(host=host.decode("latin-1")[:100])
        if origin is not None and not _same_origin(scope, origin, host):
            return 403, CROSS_SITE
        return None


def _same_origin(scope: Scope, origin: bytes, host: bytes | None) -> bool:
    """`Origin` equals this request's own `scheme://host[:port]` (as the browser spells
    both, default ports left out)."""
    if host is None:
        return False
    own = str(scope.get("scheme", "http")).encode() + b"://" + host
    return origin.lower() == own.lower()


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 413:  # the body is left unread: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
