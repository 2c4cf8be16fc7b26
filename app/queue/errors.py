"""One exception root for every domain error; the HTTP layer maps each class to a status once."""


class QueueError(Exception):
    """Base of all domain errors; `detail` is meant for the human reading the response."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(QueueError):
    """The job or lease does not exist (or never did)."""

    code = "not_found"


class Conflict(QueueError):
    """The request is valid but the job's current state forbids it. A refused change to a
    lease says why in `code`; when that lease itself finished the job, `job` is the
    finished job, so a retried ack or fail can tell "done" from "lost"."""

    def __init__(self, detail: str, code: str = "conflict", job: object | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.job = job


class InvalidCursor(QueueError):
    """A paging cursor this server did not issue for this list."""

    field = ("query", "cursor")
    kind = "invalid_cursor"


class PayloadTooLarge(QueueError):
    """A job payload over the configured byte limit."""


class StorageUnavailable(QueueError):
    """The database cannot be reached or written right now; the request may be retried."""


class Overloaded(QueueError):
    """Too many long polls are open; the client should retry later."""


class Unauthenticated(QueueError):
    """No API token, or one the server does not know."""


class Forbidden(QueueError):
    """An API token without the scope this request needs."""


class IdempotencyKeyReused(QueueError):
    """An Idempotency-Key sent again with a different request."""

    field = ("header", "Idempotency-Key")
    kind = "idempotency_key_reused"
