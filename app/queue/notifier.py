"""Wakes long-polling lease requests when work may be there for them, so that idle polls
cost nothing.

What is known in memory, per job name (never per job):
- whether the name may have ready jobs: a reserve that found nothing marks it empty,
  and any news of a ready job (enqueue, retry, release, expiry, another replica's NOTIFY,
  a due time reached, a recheck that found one) clears the mark;
- the earliest known time a job of it comes due, as one timer;
- whether it is held: paused or at a limit, as the read after an empty reserve saw it.
  News of a ready job does not wake the waiters of a held name (they could not lease
  it); what may end the hold does, one waiter at a time: a lease of it ending (ack, fail,
  expiry, release), a setting changed, news from another replica, or the time its next
  rate-limit token is due.

A waiting poll touches the database only when woken. Wakes from news about one job wake
one waiter; wakes that do not say how many jobs are ready (a due time, a recheck) wake
one waiter, and a woken waiter that found work passes the wake on (a chain), so a
thousand waiters never recheck in lockstep. Per name, the earliest due time is looked up
with a read when unknown, and a rare jittered recheck (a read) is the safety net for news
that was lost. A lost or spurious wake costs latency or one query, never a job.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from app.queue.clock import Clock

log = logging.getLogger("bgjobs.queue.notifier")

Peek = Callable[[str], Awaitable[datetime | None]]  # earliest available_at of a name


class Waiter:
    """One long-poll: woken once per arming, by a job of any of its names."""

    def __init__(self, notifier: "Notifier", names: tuple[str, ...]) -> None:
        self._notifier = notifier
        self.names = names
        self._event = asyncio.Event()
        self.armed = False
        self.admitted = False  # counted among the bounded long polls once it first waits
        self.chained = False  # woken without a count of jobs: pass the wake on if it finds work
        self.sleeping = False  # in wait(), not between a wake and its next look
        self.claim: Any = None  # what a hand-off needs to reserve a job for it (the caller's)
        self.handed: asyncio.Future[Any] | None = None  # a job handed to it, once committed
        self.hung_up = False  # its client left while it slept: no news woke it

    def arm(self) -> None:
        """Listen again; call before checking the database so no wake falls in between."""
        self._event.clear()
        self.chained = False
        if not self.armed:
            self._notifier._enlist(self)
            self.armed = True

    def take(self) -> None:
        """Out of the queues: no other wake or hand-off picks it (it is not woken yet)."""
        self.armed = False
        self._notifier._forget(self)

    def wake(self, chained: bool = False) -> None:
        self.take()
        self.chained = chained
        self._event.set()

    def hang_up(self) -> None:
        """Its client left: stop sleeping. No wake came, so none is passed on at the end
        (unless news had already woken it)."""
        if not self._event.is_set():
            self.take()
            self.hung_up = True
            self._event.set()

    @property
    def woken(self) -> bool:
        """Woken by news (or a hand-off), not by its client leaving."""
        return self._event.is_set() and not self.hung_up

    async def wait(self, seconds: float) -> bool:
        """True if woken, False if `seconds` passed first."""
        self.sleeping = True
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancel that lands as the
            # event is set, and the poll would outlive its cancelled request.
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError:
            return False
        finally:
            self.sleeping = False
        return True


class Notifier:
    """In-process wake-ups: per name, a FIFO of waiters, readiness, a due timer, a recheck."""

    def __init__(
        self,
        clock: Clock,
        peek: Peek | None = None,
        recheck_s: float = 5.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._peek = peek
        self._recheck_s = recheck_s
        self._rand = rand
        # Per name, the armed waiters in arrival order (a dict is an ordered set).
        self._waiting: dict[str, dict[Waiter, None]] = {}
        self._timers: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}
        self._empty: set[str] = set()  # names a reserve found with nothing ready
        self._news: dict[str, int] = {}  # per name, how many times it may have become ready
        self._due_known: set[str] = set()  # names whose next due time is a timer (or none)
        self._rechecks: dict[str, asyncio.TimerHandle] = {}
        self._peeks: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, asyncio.TimerHandle | None] = {}  # name -> its release timer
        self._releases: dict[str, int] = {}  # per name, how many times a hold may have ended

    @contextlib.contextmanager
    def waiter(self, names: Iterable[str]) -> Iterator[Waiter]:
        waiter = Waiter(self, tuple(dict.fromkeys(names)))
        try:
            yield waiter
        finally:
            was_woken, waiter.armed = waiter.woken, False
            self._forget(waiter)
            if was_woken and waiter.handed is None:
                # A wake this waiter will not use (its client left, or it just returned)
                # is passed on, so a job is never left waiting for a waiter that is gone.
                for name in waiter.names:
                    self.notify(name, 1, chained=waiter.chained)

    # -- readiness ----------------------------------------------------------------------

    def may_be_ready(self, names: Iterable[str]) -> bool:
        """False only if every name is known to have nothing ready, not even a job whose
        due time has passed (its timer may not have fired yet): then a poll need not look
        at the database at all."""
        now = self._clock.now()
        for name in names:
            if name in self._held:
                continue
            timer = self._timers.get(name)
            if name not in self._empty or (timer is not None and timer[0] <= now):
                return True
        return False

    def marks(self, names: Iterable[str]) -> tuple[int, ...]:
        """Take before a reserve; hand to `found_empty` after it."""
        return tuple(self._news.get(name, 0) for name in names)

    def found_empty(self, names: Iterable[str], marks: tuple[int, ...]) -> None:
        """A reserve found nothing ready: remember it, unless news came in meanwhile."""
        for name, mark in zip(names, marks, strict=True):
            if self._news.get(name, 0) == mark:
                self._empty.add(name)

    def _ready(self, name: str) -> None:
        self._empty.discard(name)
        self._news[name] = self._news.get(name, 0) + 1

    # -- wakes ----------------------------------------------------------------------------

    def notify(self, name: str, count: int, chained: bool = False) -> None:
        """Jobs of `name` became ready: wake up to `count` waiters (one per job), unless
        the name is held."""
        self._ready(name)
        if name in self._held:
            return
        while count > 0 and (queue := self._waiting.get(name)):
            next(iter(queue)).wake(chained)
            count -= 1

    def hand_over(self, name: str) -> Waiter | None:
        """The poll of `name` that has waited longest, if it is asleep: taken out of the
        queue with `handed`, a future for the job the caller is about to reserve for it (a
        direct hand-off); the caller wakes it once that write is under way. None if that
        poll is busy looking, or there is none."""
        queue = self._waiting.get(name)
        if not queue or name in self._held:
            return None
        waiter = next(iter(queue))
        if not waiter.sleeping or waiter.claim is None:
            return None
        waiter.handed = asyncio.get_running_loop().create_future()
        waiter.take()
        return waiter

    def chain(self, names: Iterable[str]) -> None:
        """A waiter woken without a count found work: there may be more, wake the next."""
        for name in names:
            self.notify(name, 1, chained=True)

    # -- holds ----------------------------------------------------------------------------

    def releases(self, names: Iterable[str]) -> tuple[int, ...]:
        """Take before a reserve; hand to `hold` after the read that follows it."""
        return tuple(self._releases.get(name, 0) for name in names)

    def hold(self, name: str, until: datetime | None, mark: int) -> None:
        """`name` is paused or at a limit: its waiters sleep through news of ready jobs
        until `release`, or until `until` (when its next rate-limit token is due). Not if
        a release came after `mark` was taken: the read may predate it, so a waiter
        looks again at once (a hold that ends now)."""
        if self._releases.get(name, 0) != mark:
            until = self._clock.now()
        self._drop_hold(name)
        handle = None
        if until is not None:
            delay = max(0.0, (until - self._clock.now()).total_seconds())
            handle = asyncio.get_running_loop().call_later(delay, self.release, name)
        self._held[name] = handle

    def unheld(self, name: str, mark: int) -> None:
        """The read after an empty reserve found `name` free: but if a hold ended since
        `mark` (a slot freed while the reserve was in flight), the reserve may have missed
        room that is there now, and nobody else was woken for it: one waiter looks again."""
        if self._releases.get(name, 0) != mark:
            self.notify(name, 1, chained=True)

    def held(self, name: str) -> bool:
        return name in self._held

    def release(self, name: str) -> None:
        """What held `name` may have ended (a lease of it ended, a setting changed, a
        token came due): wake one waiter to look, who passes the wake on if it finds work."""
        self._releases[name] = self._releases.get(name, 0) + 1
        if name in self._held:
            self._drop_hold(name)
            self.notify(name, 1, chained=True)

    def _drop_hold(self, name: str) -> None:
        handle = self._held.pop(name, None)
        if handle is not None:
            handle.cancel()

    def wake_all(self) -> None:
        """Wake every waiter: news may have been missed, so everyone should look."""
        for name in list(self._held):
            self._drop_hold(name)
        self._empty.clear()
        self._due_known.clear()
        for name in list(self._waiting):
            self.notify(name, len(self._waiting.get(name, ())))

    def notify_at(self, name: str, due: datetime) -> None:
        """A job of `name` comes due at `due`: keep one timer per name, at the earliest."""
        current = self._timers.get(name)
        if current is not None and current[0] <= due:
            return
        if current is not None:
            current[1].cancel()
        self._arm_timer(name, due)

    def _arm_timer(self, name: str, due: datetime) -> None:
        delay = max(0.0, (due - self._clock.now()).total_seconds())
        handle = asyncio.get_running_loop().call_later(delay, self._due, name)
        self._timers[name] = (due, handle)

    def _due(self, name: str) -> None:
        due, _ = self._timers.pop(name)
        if self._clock.now() < due:  # loop timers may fire a little early: not yet due
            self._arm_timer(name, due)
            return
        self._due_known.discard(name)  # the next due time is not known any more
        self.notify(name, 1, chained=True)

    # -- parking: what a waiter about to sleep makes sure of ----------------------------

    def parked(self, waiter: Waiter) -> None:
        """Before a waiter sleeps: each of its names gets a recheck, and a due timer if one
        is unknown (both reads, coalesced per name)."""
        for name in waiter.names:
            if name not in self._rechecks:
                self._schedule_recheck(name)
            if name not in self._due_known:
                self._start_peek(name)

    def _schedule_recheck(self, name: str) -> None:
        delay = self._recheck_s * (0.75 + 0.5 * self._rand())  # jittered: never in lockstep
        self._rechecks[name] = asyncio.get_running_loop().call_later(delay, self._recheck, name)

    def _recheck(self, name: str) -> None:
        del self._rechecks[name]
        if name in self._waiting:
            self.release(name)  # a hold whose end was never heard of is looked at again
            self._start_peek(name)
            self._schedule_recheck(name)

    def _start_peek(self, name: str) -> None:
        if self._peek is None or name in self._peeks:
            return
        self._peeks[name] = asyncio.get_running_loop().create_task(self._peek_once(name))

    async def _peek_once(self, name: str) -> None:
        """One read: wake a waiter if a job is ready, or set the timer for the next one."""
        assert self._peek is not None
        try:
            earliest = await self._peek(name)
        except Exception as exc:  # an outage: let polls look for themselves
            log.warning("looking for due jobs of %r failed: %s", name, exc)
            self._empty.discard(name)
            return
        finally:
            self._peeks.pop(name, None)
        self._due_known.add(name)
        if earliest is None:
            return
        if earliest <= self._clock.now():
            self.notify(name, 1, chained=True)
        else:
            self.notify_at(name, earliest)

    # -- bookkeeping ----------------------------------------------------------------------

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
        for handle in self._rechecks.values():
            handle.cancel()
        for task in self._peeks.values():
            task.cancel()
        for name in list(self._held):
            self._drop_hold(name)
        self._timers.clear()
        self._rechecks.clear()
        self._peeks.clear()
