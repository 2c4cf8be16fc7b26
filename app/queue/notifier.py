"""Wakes long-polling lease requests when work may be there for them.

Notifications only wake: every woken waiter re-checks the database, and every wait is
bounded, so a lost or spurious wake costs latency or one query, never a job.
"""

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

from app.queue.clock import Clock


class Waiter:
    """One long-poll: woken once per arming, by a job of any of its names."""

    def __init__(self, notifier: "Notifier", names: tuple[str, ...]) -> None:
        self._notifier = notifier
        self.names = names
        self._event = asyncio.Event()
        self.armed = False
        self.admitted = False  # counted among the bounded long polls once it first waits

    def arm(self) -> None:
        """Listen again; call before checking the database so no wake falls in between."""
        self._event.clear()
        if not self.armed:
            self._notifier._enlist(self)
            self.armed = True

    def wake(self) -> None:
        self.armed = False
        self._notifier._forget(self)
        self._event.set()

    @property
    def woken(self) -> bool:
        return self._event.is_set()

    async def wait(self, seconds: float) -> bool:
        """True if woken, False if `seconds` passed first."""
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return False
        return True


class Notifier:
    """In-process wake-ups, one FIFO of waiters per job name."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # Per name, the armed waiters in arrival order (a dict is an ordered set).
        self._waiting: dict[str, dict[Waiter, None]] = {}
        self._timers: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}

    @contextmanager
    def waiter(self, names: Iterable[str]) -> Iterator[Waiter]:
        waiter = Waiter(self, tuple(dict.fromkeys(names)))
        try:
            yield waiter
        finally:
            was_woken, waiter.armed = waiter.woken, False
            self._forget(waiter)
            if was_woken:
                # A wake this waiter will not use (its client left, or it just returned)
                # is passed on, so a job is never left waiting for a waiter that is gone.
                for name in waiter.names:
                    self.notify(name, 1)

    def notify(self, name: str, count: int) -> None:
        """Wake up to `count` waiters for `name`: one per job that became available."""
        while count > 0 and (queue := self._waiting.get(name)):
            next(iter(queue)).wake()
            count -= 1

    def wake_all(self) -> None:
        """Wake every waiter: news may have been missed, so everyone should look."""
        for name in list(self._waiting):
            self.notify(name, len(self._waiting.get(name, ())))

    def notify_at(self, name: str, due: datetime) -> None:
        """Wake the waiters for `name` when a job of it comes due.

        Only the earliest due time per name is kept as a timer: waiters that wake at it
        ask the database for the next one themselves.
        """
        if name not in self._waiting:
            return
        current = self._timers.get(name)
        if current is not None and current[0] <= due:
            return
        if current is not None:
            current[1].cancel()
        delay = max(0.0, (due - self._clock.now()).total_seconds())
        handle = asyncio.get_running_loop().call_later(delay, self._due, name)
        self._timers[name] = (due, handle)

    def _due(self, name: str) -> None:
        self._timers.pop(name, None)
        self.notify(name, len(self._waiting.get(name, ())))

    def _enlist(self, waiter: Waiter) -> None:
        for name in waiter.names:
            self._waiting.setdefault(name, {})[waiter] = None

    def _forget(self, waiter: Waiter) -> None:
        for name in waiter.names:
            queue = self._waiting.get(name)
            if queue is not None:
                queue.pop(waiter, None)
                if not queue:
                    del self._waiting[name]

    def close(self) -> None:
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
