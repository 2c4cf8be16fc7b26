"""Refuse request bodies over the limit before they are read whole."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.schemas import ErrorOut


class BodyTooLarge(Exception):
    """Raised while reading a body that grew past the limit."""


class BodyLimit:
    """ASGI middleware: a declared Content-Length over `max_bytes` is answered 413 at once;
    a body without one is counted as it streams in and cut off at the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.detail)
            return message

        await self.app(scope, counted, send)

    @property
    def detail(self) -> str:
        return f"request body is over the {self.max_bytes}-byte limit"

    async def _refuse(self, send: Send) -> None:
        body = ErrorOut(detail=self.detail).model_dump_json().encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
