"""Job changes for live dashboards: a bounded fan-out with a short replay window.

The service publishes each change (enqueued, leased, succeeded, failed, retrying, expired,
released, retried, deleted) with the job's id, name and new state. Subscribers get them in
order; a subscriber that falls `MAX_BACKLOG` events behind is dropped rather than buffered
without limit. Event ids are `<epoch>-<seq>`: a reconnecting client sends its last id and
gets what it missed while the recent events still cover it, else a `reset` (reload).
Publishing costs a deque append when anyone listens or listened within the window, and
nothing at all otherwise.
"""

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.queue.errors import Overloaded

WINDOW = 10_000  # recent events kept for resuming
RESUME_S = 60.0  # after the last subscriber leaves, events are kept this long for it
MAX_BACKLOG = 5_000  # events one subscriber may have unsent before it is dropped


@dataclass(slots=True)
class Event:
    seq: int
    kind: str  # "job" (a change), "coalesced" (a burst elsewhere, counted), "reset"
    data: dict[str, Any]


@dataclass(eq=False, slots=True)
class Subscriber:
    name: str | None
    queue: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False

    def push(self, event: Event) -> None:
        if self.dropped or (self.name not in (None, event.data.get("name", self.name))):
            return  # a reset (no name) goes to every stream
        if len(self.queue) >= MAX_BACKLOG:
            self.dropped = True  # a slow reader: let it go rather than buffer without limit
            self.queue.clear()
        else:
            self.queue.append(event)
        self.wake.set()

    def take(self) -> list[Event]:
        events = list(self.queue)
        self.queue.clear()
        self.wake.clear()
        return events


class EventHub:
    def __init__(self, max_subscribers: int = 100) -> None:
        self.epoch = secrets.token_hex(4)
        self.max_subscribers = max_subscribers
        self.seq = 0
        self.recent: deque[Event] = deque(maxlen=WINDOW)
        self.unrecorded = 0  # the last seq that was not kept (nobody could resume past it)
        self.subscribers: set[Subscriber] = set()
        self.last_left = float("-inf")
        self.closed = asyncio.Event()
        # Set by the relay while other replicas watch: every change goes to it as well.
        self.forward: Callable[[str, str, str, str, datetime], None] | None = None
        self.on_first_subscriber: Callable[[], None] | None = None

    def event_id(self, seq: int) -> str:
        return f"{self.epoch}-{seq}"

    @property
    def wanted(self) -> bool:
        """Whether a change would reach anyone: a stream here, one that may resume, or
        another replica's (a batch skips building its events when not)."""
        if self.subscribers or self.forward is not None:
            return True
        return time.monotonic() - self.last_left <= RESUME_S

    def publish(self, job_id: str, name: str, change: str, state: str, at: datetime) -> None:
        if self.forward is not None:  # other replicas watch (see relay)
            self.forward(job_id, name, change, state, at)
        if self._recording():
            data = {"id": job_id, "name": name, "change": change, "state": state, "at": at}
            self._add(Event(self.seq, "job", data))

    def publish_remote(self, job_id: str, name: str, change: str, state: str, at: datetime) -> None:
        """A change made on another replica: recorded here, never forwarded again."""
        if self._recording():
            data = {"id": job_id, "name": name, "change": change, "state": state, "at": at}
            self._add(Event(self.seq, "job", data))

    def publish_counts(self, name: str, changes: dict[str, int]) -> None:
        """A burst on another replica, as counts of its changes (see relay)."""
        if self._recording():
            data = {"name": name, "count": sum(changes.values()), "changes": changes}
            self._add(Event(self.seq, "coalesced", data))

    def reset(self) -> None:
        """Changes were lost: every stream tells its reader to reload."""
        if self._recording():
            self._add(Event(self.seq, "reset", {}))
            self.unrecorded = self.seq  # nobody may resume from before the loss

    def _recording(self) -> bool:
        """Count the change; False if nobody listens or could resume (then it is gone)."""
        self.seq += 1
        if not self.subscribers and time.monotonic() - self.last_left > RESUME_S:
            self.unrecorded = self.seq
            return False
        return True

    def _add(self, event: Event) -> None:
        self.recent.append(event)
        for subscriber in self.subscribers:
            subscriber.push(event)

    def subscribe(self, name: str | None, last_id: str | None) -> Subscriber:
        """A new subscriber, primed with what it missed since `last_id` (or a reset)."""
        if len(self.subscribers) >= self.max_subscribers:
            raise Overloaded(
                f"{self.max_subscribers} event streams are open, the most allowed; retry later"
            )
        subscriber = Subscriber(name)
        if last_id is not None:
            for event in self._missed(last_id):
                subscriber.push(event)
        self.subscribers.add(subscriber)
        if len(self.subscribers) == 1 and self.on_first_subscriber is not None:
            self.on_first_subscriber()
        return subscriber

    def _missed(self, last_id: str) -> list[Event]:
        epoch, _, seq_text = last_id.rpartition("-")
        if epoch != self.epoch or not seq_text.isdigit() or int(seq_text) > self.seq:
            return [Event(self.seq, "reset", {})]
        last = int(seq_text)
        first_kept = self.recent[0].seq if self.recent else self.seq + 1
        if last < self.unrecorded or last + 1 < first_kept:
            return [Event(self.seq, "reset", {})]  # some of what it missed is gone
        return [event for event in self.recent if event.seq > last]

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        if not self.subscribers:
            self.last_left = time.monotonic()

    def close(self) -> None:
        """SIGTERM: every stream ends at once."""
        self.closed.set()
        for subscriber in self.subscribers:
            subscriber.wake.set()
