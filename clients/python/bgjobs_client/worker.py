"""A worker: long-polls for as many jobs as it has free slots, runs their handlers, keeps
their leases alive, acks or fails each, and drains on SIGTERM.

    worker = Worker(client, worker_id="mail-1", concurrency=8)

    @worker.handler("send_email")
    def send_email(job): ...      # return: ack; raise: fail; raise RetryIn(ms): retry then

    worker.run()

Sync handlers run in threads, `async def` handlers on the worker's event loop. Acks and
fails are never dropped: they are retried until the server answers (a 409 `code` of
`finished_by_this_lease` means an earlier try committed). Acks that finish together go
out as one `POST /leases/ack`.
"""

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bgjobs_client.client import AsyncClient, Client, backoff
from bgjobs_client.errors import ApiError, Unreachable
from bgjobs_client.models import Job, Lease

log = logging.getLogger("bgjobs_client.worker")

MAX_EXCEPTION_BYTES = 65536  # the server's limit on a fail's exception text
BATCH = 1000  # the most ids one batch call takes
# Frames of the worker and the thread pool: not the handler's story, left out of tracebacks.
INTERNAL = (os.path.dirname(__file__), os.path.dirname(concurrent.futures.__file__))
Middleware = Callable[[Job], contextlib.AbstractContextManager[Any]]


class RetryIn(Exception):
    """Raise from a handler to fail this run and retry the job in `ms` milliseconds."""

    def __init__(self, ms: int, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {ms} ms")
        self.ms = ms


class HandlerTimeout(Exception):
    """A handler ran past its timeout; its job is failed."""


@dataclass(frozen=True, slots=True)
class Handler:
    function: Callable[[Job], Any]
    timeout: float | None
    is_async: bool


def exception_text(exc: BaseException) -> str:
    """`Type: message` on the first line (dashboards group failures by it), then the
    handler's traceback without the worker's own frames; clipped to the server's 64 KiB."""
    summary = f"{type(exc).__qualname__}: {exc}" if str(exc) else type(exc).__qualname__
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(INTERNAL)
    ]
    trace = "".join(traceback.format_list(frames)).rstrip()
    return clip(f"{summary}\n\nTraceback (most recent call last):\n{trace}" if trace else summary)


def clip(text: str, limit: int = MAX_EXCEPTION_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    head, tail = data[: limit // 4], data[-(limit * 3 // 4 - 64) :]
    return head.decode(errors="ignore") + "\n[... clipped ...]\n" + tail.decode(errors="ignore")


class Worker:
    """Runs registered handlers for the jobs of their names (see the module docstring)."""

    def __init__(
        self,
        client: Client | AsyncClient,
        worker_id: str | None = None,
        concurrency: int = 4,
        *,
        lease_ms: int = 30_000,
        wait_ms: int = 30_000,
        shutdown_timeout: float = 25.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.settings = client.settings()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency
        self.lease_ms = lease_ms
        self.wait_ms = wait_ms
        self.shutdown_timeout = shutdown_timeout
        self.handlers: dict[str, Handler] = {}
        self.middlewares: list[Middleware] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # -- registration ------------------------------------------------------------------

    def handler(
        self, name: str, *, timeout: float | None = None
    ) -> Callable[[Callable[[Job], Any]], Callable[[Job], Any]]:
        """Register the function for jobs named `name`; with `timeout` (seconds), a run
        that takes longer is failed (its slot stays taken until the function returns)."""

        def register(function: Callable[[Job], Any]) -> Callable[[Job], Any]:
            is_async = inspect.iscoroutinefunction(function)
            self.handlers[name] = Handler(function, timeout, is_async)
            return function

        return register

    def middleware(self, factory: Middleware) -> Middleware:
        """Register a context manager factory entered around every handler call, in the
        handler's thread: for logging, metrics and tracing. It sees the handler's
        exception (and may record it); the job fails unless it suppresses it."""
        self.middlewares.append(factory)
        return factory

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        """Work until SIGTERM or SIGINT, then drain. If handlers are still running after
        `shutdown_timeout`, their leases are released and the process exits (status 1):
        a thread cannot be stopped, and the exit ends it."""
        drained = asyncio.run(self.run_async(signals=True))
        if not drained:
            logging.shutdown()
            os._exit(1)

    def stop(self) -> None:
        """Ask the worker to stop leasing and drain (from any thread)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    async def run_async(self, signals: bool = False) -> bool:
        """Work until `stop()` (or, with `signals`, SIGTERM/SIGINT); True when every
        running handler finished, False when some were abandoned and their leases
        released."""
        if not self.handlers:
            raise RuntimeError("no handlers: register one with @worker.handler(name)")
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        run = _Run(self, AsyncClient(**self.settings), self._stop)
        with self._signals(signals):
            try:
                return await run.main()
            finally:
                await run.close()

    @contextlib.contextmanager
    def _signals(self, install: bool) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        wanted = install and threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGTERM, signal.SIGINT) if wanted else ()
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: stop leasing, let running jobs finish", sig.name)
        if self._stop is not None:
            self._stop.set()


class _Run:
    """One run of a worker: the state that lives on its event loop."""

    def __init__(self, worker: Worker, client: AsyncClient, stop: asyncio.Event) -> None:
        self.w = worker
        self.client = client
        self.stop = stop
        self.running = 0  # handler calls not yet returned (timed-out ones included)
        self.slot_freed = asyncio.Event()
        self.held: dict[str, Lease] = {}  # leases whose outcome is not yet sent
        self.outbox: set[asyncio.Task[None]] = set()  # acks and fails being delivered
        self.acks: list[tuple[str, asyncio.Future[None]]] = []
        self.acks_ready = asyncio.Event()
        self.sending: set[str] = set()  # lease ids of the ack request in flight
        self.executor = ThreadPoolExecutor(worker.concurrency, thread_name_prefix="bgjobs")
        self.tasks: set[asyncio.Task[None]] = set()

    async def main(self) -> bool:
        w = self.w
        log.info("worker %s: %s, concurrency %d", w.worker_id, ", ".join(w.handlers), w.concurrency)
        helpers = [
            asyncio.create_task(self.heartbeats()),
            asyncio.create_task(self.ack_sender()),
        ]
        try:
            await self.lease_loop()
            return await self.drain()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def close(self) -> None:
        await self.client.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- leasing -----------------------------------------------------------------------

    async def lease_loop(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            free = self.w.concurrency - self.running
            if free <= 0:
                self.slot_freed.clear()
                await self.first(self.slot_freed.wait())
                continue
            try:
                leases = await self.first(self.lease(free))
            except (Unreachable, ApiError) as exc:
                delay = backoff(attempt, base=0.2, cap=10.0)
                log.warning("lease failed (%s); again in %.1f s", exc, delay)
                await self.first(asyncio.sleep(delay))
                attempt += 1
                continue
            attempt = 0
            for lease in leases or []:
                if self.stop.is_set():
                    await self.give_back([lease])
                else:
                    self.start(lease)

    async def lease(self, free: int) -> list[Lease]:
        w = self.w
        return await self.client.lease(
            list(w.handlers),
            worker_id=w.worker_id,
            max_jobs=min(free, BATCH),
            wait_ms=w.wait_ms,
            lease_ms=w.lease_ms,
        )

    async def first(self, awaitable: Any) -> Any:
        """Await `awaitable` unless a stop comes first (then cancel it: a long poll cut
        short gives its jobs back on the server)."""
        task = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    def start(self, lease: Lease) -> None:
        self.running += 1
        self.held[lease.id] = lease
        task = asyncio.create_task(self.work(lease))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- running a job -----------------------------------------------------------------

    async def work(self, lease: Lease) -> None:
        handler = self.w.handlers[lease.job.name]
        try:
            error = await self.call(handler, lease)
        finally:
            self.running -= 1
            self.slot_freed.set()
        if not isinstance(error, HandlerTimeout):  # a timeout's fail has gone already
            await self.finish(lease, error)

    async def call(self, handler: Handler, lease: Lease) -> BaseException | None:
        """Run the handler: the error it raised, or None. On a timeout the lease is failed
        at once, but the slot stays taken until the handler returns."""
        job = lease.job
        if handler.is_async:
            running: asyncio.Future[Any] = asyncio.ensure_future(self.call_async(handler, job))
        else:
            loop = asyncio.get_running_loop()
            running = loop.run_in_executor(self.executor, self.call_sync, handler, job)
        done, _ = await asyncio.wait({running}, timeout=handler.timeout)
        if done:
            return running.exception()
        timeout = HandlerTimeout(
            f"handler {job.name!r} ran past its timeout of {handler.timeout:g} s"
        )
        self.spawn(self.finish(lease, timeout))
        if handler.is_async:
            running.cancel()
        await asyncio.wait({running})  # a thread cannot be stopped: it holds its slot till done
        return timeout

    def call_sync(self, handler: Handler, job: Job) -> Any:
        with self.wrapped(job):
            return handler.function(job)

    async def call_async(self, handler: Handler, job: Job) -> Any:
        with self.wrapped(job):
            return await handler.function(job)

    @contextlib.contextmanager
    def wrapped(self, job: Job) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for middleware in self.w.middlewares:
                stack.enter_context(middleware(job))
            yield

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.outbox.add(task)
        task.add_done_callback(self.outbox.discard)

    # -- outcomes ----------------------------------------------------------------------

    async def finish(self, lease: Lease, error: BaseException | None) -> None:
        """Ack (error None) or fail the lease, retried until the server answers."""
        if lease.id not in self.held:
            return  # already failed by its timeout
        if error is None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.acks.append((lease.id, future))
            self.acks_ready.set()
            await future
        else:
            self.held.pop(lease.id, None)
            await self.fail(lease, error)

    async def fail(self, lease: Lease, error: BaseException) -> None:
        retry_in = error.ms if isinstance(error, RetryIn) else None
        text = f"RetryIn: {error}" if isinstance(error, RetryIn) else exception_text(error)
        job = lease.job

        async def send() -> None:
            outcome = await self.client.fail(lease.id, text, retry_in_ms=retry_in)
            log.warning("job %s (%s) failed, %s: %s", job.id, job.name, outcome.outcome, error)

        await self.until_answered(send, f"fail of job {job.id}")

    async def ack_sender(self) -> None:
        """Sends the acks that have finished since the last send as one request."""
        while True:
            await self.acks_ready.wait()
            self.acks_ready.clear()
            batch, self.acks = self.acks[:BATCH], self.acks[BATCH:]
            if self.acks:
                self.acks_ready.set()
            if batch:
                await self.send_acks(batch)

    async def send_acks(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        ids = [lease_id for lease_id, _ in batch]

        async def send() -> None:
            if len(ids) == 1:
                await self.client.ack(ids[0])
                return
            for result in await self.client.ack_many(ids):
                if not result.done:
                    log.warning("ack of lease %s refused: %s", result.id, result.detail)

        self.sending = set(ids)
        await self.until_answered(send, f"ack of {len(ids)} lease(s)")
        self.sending = set()
        for lease_id, future in batch:
            self.held.pop(lease_id, None)
            if not future.done():
                future.set_result(None)

    async def until_answered(self, send: Callable[[], Any], what: str) -> None:
        """Retry `send` through network errors and outages until the server answers; a
        refusal (404, 409, ...) is an answer too, and is logged."""
        attempt = 0
        while True:
            try:
                await send()
                return
            except ApiError as exc:
                if not exc.retryable:
                    log.warning("%s refused: %s", what, exc)
                    return
                error: Exception = exc
            except Unreachable as exc:
                error = exc
            delay = backoff(attempt, base=0.2, cap=10.0)
            log.warning("%s: %s; again in %.1f s", what, error, delay)
            await asyncio.sleep(delay)
            attempt += 1

    # -- heartbeats --------------------------------------------------------------------

    async def heartbeats(self) -> None:
        """Every lease_ms/3, extend every lease held; a refused one is lost (it expired
        and may run elsewhere): say so."""
        interval = self.w.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            ids = list(self.held)
            for start in range(0, len(ids), BATCH):
                await self.extend(ids[start : start + BATCH])

    async def extend(self, ids: list[str]) -> None:
        try:
            results = await self.client.extend_many(ids, self.w.lease_ms)
        except (Unreachable, ApiError) as exc:
            log.warning("heartbeat of %d lease(s) failed: %s", len(ids), exc)
            return
        for result in results:
            if not result.ok and result.id in self.held:
                log.warning("lease %s was lost: %s", result.id, result.detail)

    # -- shutdown ----------------------------------------------------------------------

    async def drain(self) -> bool:
        """After a stop: wait for running handlers and for their acks and fails, up to
        `shutdown_timeout`; then release the leases of handlers still running."""
        deadline = asyncio.get_running_loop().time() + self.w.shutdown_timeout
        if self.running:
            log.info("draining: %d job(s) running", self.running)
        while self.running and asyncio.get_running_loop().time() < deadline:
            self.slot_freed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot_freed.wait(), remaining)
        pending = set(self.tasks) | set(self.outbox)
        remaining = deadline - asyncio.get_running_loop().time()
        if pending and remaining > 0:
            await asyncio.wait(pending, timeout=remaining)
        undelivered = [task for task in pending if not task.done()]
        if not self.running and not undelivered:
            return True
        if undelivered:
            log.warning("shutdown timeout: %d ack(s) or fail(s) undelivered", len(undelivered))
        unfinished = [self.held[i] for i in list(self.held) if i not in self.acked_ids()]
        if unfinished:
            log.warning(
                "shutdown timeout: %d job(s) unfinished; releasing their leases", len(unfinished)
            )
            await self.give_back(unfinished)
        return False

    def acked_ids(self) -> set[str]:
        """Leases whose handler returned and whose ack is queued or on its way."""
        return {lease_id for lease_id, _ in self.acks} | self.sending

    async def give_back(self, leases: list[Lease]) -> None:
        async def release(lease: Lease) -> None:
            try:
                await self.client.release(lease.id)
            except (Unreachable, ApiError) as exc:
                log.warning("release of lease %s failed: %s", lease.id, exc)
            self.held.pop(lease.id, None)

        await asyncio.gather(*(release(lease) for lease in leases))
