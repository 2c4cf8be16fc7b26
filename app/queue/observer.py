"""What the queue tells whoever watches it (metrics), kept free of any metrics library.

The service calls these on the hot path, so an implementation must be O(1) and never
block; the default does nothing.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, Protocol

from app.queue.models import Lease

Outcome = Literal["succeeded", "failed", "retrying"]
Reason = Literal["ok", "error", "expired"]


class Observer(Protocol):
    def enqueued(self, name: str, count: int) -> None:
        """`count` jobs of `name` were committed."""

    def leased(self, leases: Sequence[Lease], now: datetime) -> None:
        """These jobs were leased at `now` (each waited since its `available_at`)."""

    def finished(
        self,
        name: str,
        outcome: Outcome,
        reason: Reason,
        leased_at: datetime | None,
        now: datetime,
    ) -> None:
        """An attempt ended: acked (ok), failed (error) or its lease expired (expired)."""


class NoObserver:
    """Watches nothing (a service built without metrics, as in storage-level tests)."""

    def enqueued(self, name: str, count: int) -> None:
        pass

    def leased(self, leases: Sequence[Lease], now: datetime) -> None:
        pass

    def finished(
        self,
        name: str,
        outcome: Outcome,
        reason: Reason,
        leased_at: datetime | None,
        now: datetime,
    ) -> None:
        pass
