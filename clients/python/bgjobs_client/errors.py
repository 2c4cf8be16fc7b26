"""What a call can raise: the server's refusal, or no answer at all."""

from typing import Any


class BgjobsError(Exception):
    """Base of every error this package raises."""


class ApiError(BgjobsError):
    """The server answered with an error status; `detail` and `code` are its words."""

    def __init__(self, status: int, detail: str, code: str | None = None, body: Any = None):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.code = code
        self.body = body

    @property
    def retryable(self) -> bool:
        """An outage or overload (502, 503, 504, 429): the same request may work later."""
        return self.status in (429, 502, 503, 504)


class Unreachable(BgjobsError):
    """No answer from the server (connection refused or reset, timeout): the request may
    or may not have been applied."""
