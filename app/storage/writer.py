"""One writer with group commit, for every backend.

Concurrent writes (enqueue, reserve, ack, fail, extend, release, ...) queue up here. The
writer takes everything that has queued and runs it as one transaction, so a thousand
concurrent requests cost a handful of commits instead of a thousand; each request is
answered only after the commit that holds its change, so a 2xx still means committed.

- Items apply in arrival order; consecutive items of one kind form a *run* that a backend
  may apply with one set-based statement.
- Per-item rules never raise (fencing lives in WHERE clauses): a group that still raises
  is rolled back and its items re-run one transaction each, so only the culprit errs.
- A group that fails as a whole (an outage, a failed commit) answers every item with
  StorageUnavailable (a 503), never a success.
"""

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.queue.errors import StorageUnavailable

log = logging.getLogger("bgjobs.storage.writer")

MAX_GROUP = 2000  # items per transaction: bounds how long one commit keeps others waiting


@dataclass(slots=True)
class Op:
    """One queued write: its kind (the handler), its argument, and who waits for it."""

    kind: str
    arg: Any
    future: asyncio.Future[Any] = field(repr=False)


def runs(ops: list[Op]) -> Iterator[tuple[str, list[Op]]]:
    """Consecutive items of one kind, in arrival order."""
    start = 0
    for i in range(1, len(ops) + 1):
        if i == len(ops) or ops[i].kind != ops[start].kind:
            yield ops[start].kind, ops[start:i]
            start = i


# A backend's way to apply a group: one transaction, one result per op, in order.
ApplyGroup = Callable[[list[Op]], Awaitable[list[Any]]]


class Writer:
    def __init__(self, apply: ApplyGroup) -> None:
        self._apply = apply
        self._queue: list[Op] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.writes: Counter[str] = Counter()

    async def submit(self, kind: str, arg: Any) -> Any:
        """Queue one write and wait for its commit."""
        future = self._enqueue(kind, arg)
        return await future

    async def submit_many(self, kind: str, args: list[Any]) -> list[Any]:
        """Queue several writes at once: they land in one group (up to MAX_GROUP)."""
        futures = [self._enqueue(kind, arg) for arg in args]
        return list(await asyncio.gather(*futures))

    def _enqueue(self, kind: str, arg: Any) -> asyncio.Future[Any]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(Op(kind, arg, future))
        self._ready.set()
        return future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for op in self._queue:
            op.future.cancel()
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                await self._commit(group)
            except Exception as exc:  # a bug here must not stop every later write
                log.exception("the writer failed on a group of %d writes", len(group))
                _answer(group, exc)

    async def _commit(self, group: list[Op]) -> None:
        try:
            results = await self._apply(group)
        except StorageUnavailable as exc:
            _answer(group, exc)
            return
        except Exception as exc:
            if len(group) == 1:
                _answer(group, exc)
                return
            log.debug("a group of %d writes raised (%r); re-running one by one", len(group), exc)
            for op in group:
                await self._commit([op])
            return
        for op, result in zip(group, results, strict=True):
            self.writes[op.kind] += 1
            if not op.future.done():  # its caller may have been cancelled meanwhile
                op.future.set_result(result)


def _answer(group: list[Op], exc: BaseException) -> None:
    for op in group:
        if not op.future.done():
            op.future.set_exception(exc)
