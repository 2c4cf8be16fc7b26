"""The aiohttp load generator, run by bench/run.py as its own process pinned to core 1.

Each mode prints one JSON object on stdout (the `idle` mode prints two: when its polls
have parked, and when it was told to stop). Every result carries `cpu`: this process's
user + system seconds over the timed part (os.times), so the benchmark can tell a figure
limited by the generator from one limited by the server. Requests that fail are counted
in `errors`, with the first one described in `first_error`; the benchmark then reports
the row as failed.

    python bench/loadgen.py cycle --url URL --name N --workers 16 --max-jobs 1 --seconds 5
    python bench/loadgen.py pickup --url URL --name N --samples 100
    python bench/loadgen.py idle --url URL --name N --polls 1000
    python bench/loadgen.py latency --url URL1 --url URL2 --name N --cycles 500
    python bench/loadgen.py fill --url URL --name N --count 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

# Every job of the benchmark carries exactly this 100-byte payload (wrk's too, via env).
PAYLOAD = "bench-payload-" + "x" * 86
assert len(PAYLOAD.encode()) == 100


@dataclass(slots=True)
class Tally:
    """What a mode counts while it runs; errors keep the first description only."""

    errors: int = 0
    first_error: str | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what


def cpu_now() -> float:
    times = os.times()
    return times.user + times.system


def session(url: str, connections: int, timeout_s: float = 120) -> aiohttp.ClientSession:
    """Keep-alive connections, at most `connections` of them; no proxy from the environment."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        base_url=url,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )


JSON = {"Content-Type": "application/json"}


async def post(client: aiohttp.ClientSession, path: str, body: bytes | None) -> tuple[int, Any]:
    async with client.post(path, data=body, headers=JSON if body else None) as response:
        raw = await response.read()
    try:
        return response.status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return response.status, raw[:200].decode(errors="replace")


def lease_body(worker: str, name: str, max_jobs: int, wait_ms: int) -> bytes:
    return orjson.dumps(
        {"worker_id": worker, "names": [name], "max_jobs": max_jobs, "wait_ms": wait_ms}
    )


def job_body(name: str) -> bytes:
    return orjson.dumps({"name": name, "payload": PAYLOAD})


# -- cycle: N workers lease and ack until the backlog is gone or time is up --------------------


async def ack_all(
    client: aiohttp.ClientSession, ids: list[str], batch_ack: bool, tally: Tally
) -> int:
    """Ack leases one request each, or all in one POST /leases/ack; returns the acked count."""
    if not batch_ack:
        acked = 0
        for lease_id in ids:
            status, body = await post(client, f"/leases/{lease_id}/ack", None)
            if status == 200:
                acked += 1
            else:
                tally.error(f"POST /leases/{{id}}/ack: {status} {body}")
        return acked
    status, body = await post(client, "/leases/ack", orjson.dumps({"ids": ids}))
    if status != 200:
        tally.error(f"POST /leases/ack: {status} {body}")
        return 0
    results = body.get("results", []) if isinstance(body, dict) else []
    refused = [r for r in results if r.get("status") != 200]
    if refused or len(results) != len(ids):
        tally.error(f"POST /leases/ack: {len(refused)} refused of {len(ids)}: {refused[:1]}")
    return len(results) - len(refused)


async def cycle(args: argparse.Namespace) -> dict[str, Any]:
    tally, done, drained = Tally(), 0, False
    async with session(args.url, args.workers) as client:
        deadline = time.perf_counter() + args.seconds

        async def worker(index: int) -> None:
            nonlocal done, drained
            body = lease_body(f"bench-{index}", args.name, args.max_jobs, 0)
            while time.perf_counter() < deadline and tally.errors == 0:
                status, answer = await post(client, "/leases", body)
                if status != 200:
                    tally.error(f"POST /leases: {status} {answer}")
                    return
                ids = [lease["id"] for lease in answer["leases"]]
                if not ids:
                    drained = True
                    return
                acked = await ack_all(client, ids, args.batch_ack, tally)
                done += acked  # not `done += await ...`: that reads `done` before the await

        cpu, start = cpu_now(), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(args.workers)))
        elapsed = time.perf_counter() - start
    return {
        "jobs": done,
        "seconds": elapsed,
        "cpu": cpu_now() - cpu,
        "drained": drained,
        **result_of(tally),
    }


# -- pickup: one parked long poll, one enqueue, time until the lease arrives -------------------


async def pickup(args: argparse.Namespace) -> dict[str, Any]:
    """Each sample: a long poll parks, `settle_ms` pass, a job is enqueued; the time from
    sending the enqueue to the lease arriving. With `--yardstick URL`, each sample is
    followed by the same pause and one POST /jobs to that (minimal) app: the round trip
    any server has after an idle pause on this machine, measured alongside."""
    tally, latencies, enqueues, yardstick = Tally(), [], [], []
    lease = lease_body("bench-pickup", args.name, 1, 10_000)
    enqueue = job_body(args.name)
    async with (
        session(args.url, 2) as worker,
        session(args.url, 2) as producer,
        session(args.yardstick or args.url, 1) as minimal,
    ):

        async def wait_lease() -> tuple[float, int, Any]:
            status, answer = await post(worker, "/leases", lease)
            return time.perf_counter(), status, answer

        async def idle_round_trip() -> float:
            await asyncio.sleep(args.settle_ms / 1000)
            sent = time.perf_counter()
            status, answer = await post(minimal, "/jobs", enqueue)
            if status not in (200, 201):
                tally.error(f"yardstick POST /jobs: {status} {answer}")
            return (time.perf_counter() - sent) * 1000

        cpu, start = cpu_now(), time.perf_counter()
        for sample in range(args.warmup + args.samples):
            waiting = asyncio.create_task(wait_lease())
            await asyncio.sleep(args.settle_ms / 1000)  # the poll reaches the server and parks
            if waiting.done():
                tally.error(f"the long poll returned before the enqueue: {waiting.result()[1:]}")
                break
            sent = time.perf_counter()
            status, answer = await post(producer, "/jobs", enqueue)
            enqueued = time.perf_counter()
            if status != 201:
                tally.error(f"POST /jobs: {status} {answer}")
                waiting.cancel()
                break
            arrived, status, answer = await waiting
            if status != 200 or len(answer["leases"]) != 1:
                tally.error(f"POST /leases (wait_ms=10000): {status} {answer}")
                break
            ack_status, _ = await post(worker, f"/leases/{answer['leases'][0]['id']}/ack", None)
            if ack_status != 200:
                tally.error(f"ack after pickup: {ack_status}")
            measured = await idle_round_trip() if args.yardstick else None
            if sample >= args.warmup:
                latencies.append((arrived - sent) * 1000)
                enqueues.append((enqueued - sent) * 1000)
                if measured is not None:
                    yardstick.append(measured)
    return {
        "latencies_ms": latencies,
        "enqueue_ms": enqueues,
        "yardstick_ms": yardstick,
        "seconds": time.perf_counter() - start,
        "cpu": cpu_now() - cpu,
        **result_of(tally),
    }


# -- idle: many long polls parked on an empty queue until told to stop -------------------------


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    """Prints {"event": "parked"} once every poll has had `settle_s` to reach the server, then
    holds them until a line arrives on stdin, and returns how many ended early and why."""
    tally, statuses = Tally(), dict[int, int]()
    body_for = [lease_body(f"idle-{i}", args.name, 1, args.wait_ms) for i in range(args.polls)]
    async with session(args.url, args.polls, timeout_s=args.wait_ms / 1000 + 60) as client:

        async def poll(index: int) -> None:
            try:
                status, answer = await post(client, "/leases", body_for[index])
            except aiohttp.ClientError as exc:
                status, answer = -1, repr(exc)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200 or answer.get("leases"):
                tally.error(f"idle poll ended early: {status} {answer}")

        polls = [asyncio.create_task(poll(i)) for i in range(args.polls)]
        await asyncio.sleep(args.settle_s)
        emit({"event": "parked", "open": sum(not p.done() for p in polls), **result_of(tally)})
        cpu, start = cpu_now(), time.perf_counter()
        await asyncio.to_thread(sys.stdin.readline)
        held, elapsed, cpu = (
            sum(not p.done() for p in polls),
            time.perf_counter() - start,
            cpu_now() - cpu,
        )
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    return {
        "event": "done",
        "open_at_stop": held,
        "ended_early": {str(k): v for k, v in statuses.items()},
        "seconds": elapsed,
        "cpu": cpu,
        **result_of(tally),
    }


# -- latency: one worker's lease+ack round trip, alternating between servers -------------------


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    """Times lease(max_jobs=1) + ack on each server in turn, in blocks, so that any other load
    on the machine falls on all of them alike; after each timed cycle a replacement job is
    enqueued (not timed), so every backlog keeps its size."""
    tally = Tally()
    timings: dict[str, list[float]] = {url: [] for url in args.url}
    lease = lease_body("bench-latency", args.name, 1, 0)
    enqueue = job_body(args.name)
    clients = {url: session(url, 1) for url in args.url}
    try:

        async def one(url: str, record: bool) -> None:
            client = clients[url]
            start = time.perf_counter()
            status, answer = await post(client, "/leases", lease)
            if status != 200 or len(answer["leases"]) != 1:
                tally.error(f"{url} POST /leases: {status} {answer}")
                return
            status, answer = await post(client, f"/leases/{answer['leases'][0]['id']}/ack", None)
            if status != 200:
                tally.error(f"{url} ack: {status} {answer}")
            if record:
                timings[url].append((time.perf_counter() - start) * 1000)
            status, answer = await post(client, "/jobs", enqueue)
            if status != 201:
                tally.error(f"{url} POST /jobs: {status} {answer}")

        cpu, start = cpu_now(), time.perf_counter()
        await alternate(args.url, args.warmup, lambda url: one(url, False), tally)
        await alternate(args.url, args.cycles, lambda url: one(url, True), tally)
    finally:
        for client in clients.values():
            await client.close()
    return {
        "latencies_ms": timings,
        "seconds": time.perf_counter() - start,
        "cpu": cpu_now() - cpu,
        **result_of(tally),
    }


async def alternate(
    urls: list[str], count: int, one: Callable[[str], Awaitable[None]], tally: Tally
) -> None:
    done, block = 0, 50
    while done < count and tally.errors == 0:
        step = min(block, count - done)
        for url in urls:
            for _ in range(step):
                await one(url)
        done += step


# -- fill: POST /jobs/batch until `count` jobs or `seconds` ------------------------------------


async def fill(args: argparse.Namespace) -> dict[str, Any]:
    """Batch enqueue with `concurrency` requests in flight. A first answer of 404/405/422
    means the endpoint (or this batch size) does not exist: reported as `missing`."""
    tally, done = Tally(), 0
    body = job_batch(args.name, args.batch)
    async with session(args.url, args.concurrency) as client:
        first = min(args.batch, args.count)
        status, answer = await post(client, "/jobs/batch", job_batch(args.name, first))
        if status in (404, 405, 422):
            return {"missing": status, "detail": str(answer)[:300], "cpu": 0.0, "errors": 0}
        if status != 201 or len(answer.get("jobs", [])) != first:
            return {"errors": 1, "first_error": f"POST /jobs/batch: {status} {str(answer)[:300]}"}
        remaining = args.count - first
        deadline = time.perf_counter() + args.seconds

        async def sender() -> None:
            nonlocal remaining, done
            while remaining > 0 and time.perf_counter() < deadline and tally.errors == 0:
                size = min(args.batch, remaining)
                remaining -= size
                data = body if size == args.batch else job_batch(args.name, size)
                status, answer = await post(client, "/jobs/batch", data)
                if status == 201 and len(answer["jobs"]) == size:
                    done += size
                else:
                    tally.error(f"POST /jobs/batch: {status} {str(answer)[:300]}")

        cpu, start = cpu_now(), time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "jobs": done,
        "total": done + first,
        "seconds": elapsed,
        "cpu": cpu_now() - cpu,
        **result_of(tally),
    }


def job_batch(name: str, size: int) -> bytes:
    return orjson.dumps({"jobs": [{"name": name, "payload": PAYLOAD}] * size})


# -- main --------------------------------------------------------------------------------------


def result_of(tally: Tally) -> dict[str, Any]:
    return {"errors": tally.errors, "first_error": tally.first_error}


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in ("cycle", "pickup", "idle", "latency", "fill"):
        sub = modes.add_parser(mode)
        if mode == "latency":
            sub.add_argument("--url", required=True, action="append", help="one per server")
        else:
            sub.add_argument("--url", required=True)
        sub.add_argument("--name", required=True)
        if mode == "cycle":
            sub.add_argument("--workers", type=int, default=16)
            sub.add_argument("--max-jobs", type=int, default=1)
            sub.add_argument("--batch-ack", action="store_true")
            sub.add_argument("--seconds", type=float, default=5)
        elif mode == "pickup":
            sub.add_argument("--samples", type=int, default=100)
            sub.add_argument("--warmup", type=int, default=5)
            sub.add_argument("--settle-ms", type=float, default=20)
            sub.add_argument("--yardstick", help="a minimal app's URL, timed after the same pause")
        elif mode == "idle":
            sub.add_argument("--polls", type=int, default=1000)
            sub.add_argument("--wait-ms", type=int, default=60_000)
            sub.add_argument("--settle-s", type=float, default=2)
        elif mode == "latency":
            sub.add_argument("--cycles", type=int, default=500)
            sub.add_argument("--warmup", type=int, default=50)
        else:
            sub.add_argument("--count", type=int, required=True)
            sub.add_argument("--batch", type=int, default=1000)
            sub.add_argument("--concurrency", type=int, default=4)
            sub.add_argument("--seconds", type=float, default=600)
    return parser.parse_args(argv)


MODES: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "cycle": cycle,
    "pickup": pickup,
    "idle": idle,
    "latency": latency,
    "fill": fill,
}


def main() -> None:
    args = parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000+ sockets for `idle`
    coroutine = MODES[args.mode](args)
    try:
        import uvloop  # the generator's own overhead is lower on it
    except ImportError:
        emit(asyncio.run(coroutine))
    else:
        emit(uvloop.run(coroutine))


if __name__ == "__main__":
    main()
