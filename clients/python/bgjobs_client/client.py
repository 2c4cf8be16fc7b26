"""`AsyncClient` speaks the API; `Client` is the same calls, blocking.

`Client` runs an `AsyncClient` on a private event loop in a background thread, so both
share one implementation: every blocking method is its async twin, waited for.
"""

import asyncio
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from bgjobs_client.errors import ApiError, Unreachable
from bgjobs_client.models import FailOutcome, ItemResult, Job, Lease, Page, timestamp

P = ParamSpec("P")
R = TypeVar("R")

HISTORY = ("succeeded", "failed")


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff: spreads the retries of many clients apart."""
    return random.uniform(0, min(cap, base * 2**attempt))


def error_of(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    return ApiError(response.status_code, str(detail or response.reason_phrase), code, body)


class AsyncClient:
    """The API of one bgjobs server. Enqueues and reads retry on network errors and 503s
    (an enqueue carries an `Idempotency-Key`, so a retry never makes a second job)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        max_connections: int = 100,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.max_connections = max_connections
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        )

    def settings(self) -> dict[str, Any]:
        """What it takes to make another client like this one (e.g. on another loop)."""
        return {
            "url": self.url,
            "token": self.token,
            "timeout": self.timeout,
            "retries": self.retries,
            "max_connections": self.max_connections,
        }

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = False,
        http_timeout: float | None = None,
    ) -> Any:
        """One API call: the decoded body of a 2xx, else ApiError; Unreachable when no
        answer came. With `retry`, network errors and 429/502/503/504 are retried."""
        attempt = 0
        while True:
            try:
                return await self._send(method, path, json, params, headers, http_timeout)
            except (Unreachable, ApiError) as exc:
                retryable = isinstance(exc, Unreachable) or exc.retryable
                if not retry or not retryable or attempt >= self.retries:
                    raise
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _send(
        self,
        method: str,
        path: str,
        json: Any,
        params: dict[str, Any] | None,
        headers: dict[str, str] | None,
        http_timeout: float | None,
    ) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params=query,
                headers=headers,
                timeout=http_timeout if http_timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {self.url}{path}: {exc!r}") from exc
        if response.status_code >= 400:
            raise error_of(response)
        return response.json() if response.content else None

    # -- producers ---------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        payload: str = "",
        *,
        available_in_ms: int | None = None,
        available_at: datetime | str | None = None,
        max_retries: int | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> Job:
        """Enqueue one job (`priority` 0-9, lower runs first). Safe to retry: the same key
        never makes a second job."""
        body = job_body(name, payload, available_in_ms, available_at, max_retries, priority)
        key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        data = await self.request("POST", "/jobs", json=body, headers=key, retry=True)
        return Job.from_json(data)

    async def enqueue_many(
        self, jobs: Iterable[dict[str, Any]], *, idempotency_key: str | None = None
    ) -> list[Job]:
        """Enqueue up to 1,000 jobs at once, all or nothing; each dict holds the keyword
        arguments of `enqueue` (`name`, `payload`, `available_in_ms`, ...)."""
        body = {"jobs": [job_body(**job) for job in jobs]}
        key = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        data = await self.request("POST", "/jobs/batch", json=body, headers=key, retry=True)
        return [Job.from_json(job) for job in data["jobs"]]

    # -- workers -----------------------------------------------------------------------

    async def lease(
        self,
        names: Sequence[str],
        *,
        worker_id: str,
        max_jobs: int = 1,
        wait_ms: int = 0,
        lease_ms: int = 30_000,
    ) -> list[Lease]:
        """Reserve up to `max_jobs` jobs of `names`, waiting up to `wait_ms` for one."""
        body = {
            "worker_id": worker_id,
            "names": list(names),
            "max_jobs": max_jobs,
            "wait_ms": wait_ms,
            "lease_ms": lease_ms,
        }
        data = await self.request(
            "POST", "/leases", json=body, http_timeout=self.timeout + wait_ms / 1000
        )
        return [Lease.from_json(lease) for lease in data["leases"]]

    async def ack(self, lease_id: str) -> Job:
        """The job succeeded. A retry after a lost answer returns the job all the same."""
        try:
            data = await self.request("POST", f"/leases/{lease_id}/ack", retry=True)
        except ApiError as exc:
            return finished_job(exc)
        return Job.from_json(data)

    async def ack_many(self, lease_ids: Sequence[str]) -> list[ItemResult]:
        """Ack up to 1,000 distinct leases: one result per id, in order."""
        data = await self.request("POST", "/leases/ack", json={"ids": list(lease_ids)}, retry=True)
        return [ItemResult.from_json(item) for item in data["results"]]

    async def fail(
        self, lease_id: str, exception: str, *, retry_in_ms: int | None = None
    ) -> FailOutcome:
        """The run failed: the job retries (as its `max_retries` and backoff allow) or
        moves to the failed jobs."""
        body: dict[str, Any] = {"exception": exception}
        if retry_in_ms is not None:
            body["retry_in_ms"] = retry_in_ms
        try:
            data = await self.request("POST", f"/leases/{lease_id}/fail", json=body, retry=True)
        except ApiError as exc:
            return FailOutcome("failed", finished_job(exc))
        return FailOutcome(data["outcome"], Job.from_json(data["job"]))

    async def fail_many(self, items: Sequence[dict[str, Any]]) -> list[ItemResult]:
        """Fail up to 1,000 leases: items of `{"id", "exception", "retry_in_ms"?}`."""
        data = await self.request("POST", "/leases/fail", json={"items": list(items)}, retry=True)
        return [ItemResult.from_json(item) for item in data["results"]]

    async def extend(self, lease_id: str, lease_ms: int) -> datetime:
        """Keep the job: the lease now expires `lease_ms` from now."""
        body = {"lease_ms": lease_ms}
        data = await self.request("POST", f"/leases/{lease_id}/extend", json=body, retry=True)
        expires = timestamp(data["expires_at"])
        assert expires is not None
        return expires

    async def extend_many(self, lease_ids: Sequence[str], lease_ms: int) -> list[ItemResult]:
        """The heartbeat of a worker that holds many leases: one result per id."""
        body = {"ids": list(lease_ids), "lease_ms": lease_ms}
        data = await self.request("POST", "/leases/extend", json=body, retry=True)
        return [ItemResult.from_json(item) for item in data["results"]]

    async def release(self, lease_id: str) -> None:
        """Give the job back at once, this attempt uncounted (a worker shutting down)."""
        await self.request("DELETE", f"/leases/{lease_id}", retry=True)

    # -- operators ---------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        return Job.from_json(await self.request("GET", f"/jobs/{job_id}", retry=True))

    async def list_jobs(
        self,
        state: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """One page of jobs: pending ones (all, or of one pending `state`), or history
        with `state` `succeeded` or `failed` (newest first)."""
        path, query = "/jobs", {"state": state, "name": name, "limit": limit, "cursor": cursor}
        if state in HISTORY:
            path, query["state"] = f"/jobs/{state}", None
        data = await self.request("GET", path, params=query, retry=True)
        return Page([Job.from_json(job) for job in data["items"]], data["next_cursor"])

    async def cancel(self, job_id: str) -> None:
        """Delete a pending or finished job (a reserved one cannot be: 409)."""
        await self.request("DELETE", f"/jobs/{job_id}", retry=True)

    async def retry(self, job_id: str) -> Job:
        """Put a failed job back in the queue, its attempts reset."""
        return Job.from_json(await self.request("POST", f"/jobs/{job_id}/retry"))

    async def queues(self) -> list[dict[str, Any]]:
        """`GET /queues`: each job name with its settings (`paused`, `concurrency_limit`,
        `rate_limit`) and its jobs by state."""
        data = await self.request("GET", "/queues", retry=True)
        return list(data["queues"])

    async def configure_queue(self, name: str, /, **changes: Any) -> dict[str, Any]:
        """`PATCH /queues/{name}`: `paused` (bool), `concurrency_limit` (int, or None to
        remove it), `rate_limit` ({"count", "per_ms"}, or None to remove it); a setting not
        given is left as it is. The queue as it is now."""
        unknown = sorted(set(changes) - QUEUE_SETTINGS)
        if unknown:
            raise TypeError(f"unknown queue settings: {', '.join(unknown)}")
        queue: dict[str, Any] = await self.request(
            "PATCH", f"/queues/{name}", json=changes, retry=True
        )
        return queue

    async def stats(self, series_minutes: int | None = None) -> Any:
        """`GET /stats`: counts by state per name, and finished jobs per minute."""
        series = f"{series_minutes}m" if series_minutes else None
        return await self.request("GET", "/stats", params={"series": series}, retry=True)


QUEUE_SETTINGS = frozenset({"paused", "concurrency_limit", "rate_limit"})


def job_body(
    name: str,
    payload: str = "",
    available_in_ms: int | None = None,
    available_at: datetime | str | None = None,
    max_retries: int | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "payload": payload}
    if priority is not None:
        body["priority"] = priority
    if available_in_ms is not None:
        body["available_in_ms"] = available_in_ms
    if available_at is not None:
        body["available_at"] = (
            available_at.isoformat() if isinstance(available_at, datetime) else available_at
        )
    if max_retries is not None:
        body["max_retries"] = max_retries
    return body


def finished_job(exc: ApiError) -> Job:
    """A 409 `finished_by_this_lease` means an earlier try of this call committed: its
    job is the answer. Any other refusal is raised."""
    job = exc.body.get("job") if isinstance(exc.body, dict) else None
    if exc.code == "finished_by_this_lease" and job:
        return Job.from_json(job)
    raise exc


# -- the blocking twin -------------------------------------------------------------------


class _Portal:
    """An event loop on a daemon thread that runs the async client's calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bgjobs-client")
        self._thread.daemon = True
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Awaitable[R]],
) -> Callable[Concatenate["Client", P], R]:
    def call(self: "Client", /, *args: P.args, **kwargs: P.kwargs) -> R:
        async def run() -> R:
            return await method(self.async_client, *args, **kwargs)

        return self._portal.call(run())

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class Client:
    """The same calls as `AsyncClient`, blocking; usable from any thread."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        max_connections: int = 100,
    ) -> None:
        self._portal = _Portal()

        async def make() -> AsyncClient:
            return AsyncClient(
                url, token, timeout=timeout, retries=retries, max_connections=max_connections
            )

        self.async_client = self._portal.call(make())

    def settings(self) -> dict[str, Any]:
        return self.async_client.settings()

    def close(self) -> None:
        self._portal.call(self.async_client.aclose())
        self._portal.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    request = _blocking(AsyncClient.request)
    enqueue = _blocking(AsyncClient.enqueue)
    enqueue_many = _blocking(AsyncClient.enqueue_many)
    lease = _blocking(AsyncClient.lease)
    ack = _blocking(AsyncClient.ack)
    ack_many = _blocking(AsyncClient.ack_many)
    fail = _blocking(AsyncClient.fail)
    fail_many = _blocking(AsyncClient.fail_many)
    extend = _blocking(AsyncClient.extend)
    extend_many = _blocking(AsyncClient.extend_many)
    release = _blocking(AsyncClient.release)
    get_job = _blocking(AsyncClient.get_job)
    list_jobs = _blocking(AsyncClient.list_jobs)
    cancel = _blocking(AsyncClient.cancel)
    retry = _blocking(AsyncClient.retry)
    stats = _blocking(AsyncClient.stats)
    queues = _blocking(AsyncClient.queues)
    configure_queue = _blocking(AsyncClient.configure_queue)
