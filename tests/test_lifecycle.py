"""The server process as operators see it: clients that hang up, and SIGTERM."""

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import enqueue
from tests.test_observability import scrape, value


async def test_jobs_reserved_for_a_client_that_left_are_given_back(
    server_process: Any, db_url: str
) -> None:
    with server_process(database_url=db_url) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = b'{"worker_id": "gone", "names": ["a"], "wait_ms": 10000}'
        writer.write(
            b"POST /leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the poll is waiting
        writer.close()  # the worker hangs up
        await writer.wait_closed()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=server.url) as http:
            job = await enqueue(http, name="a")  # wakes the abandoned poll, which reserves it
            await asyncio.sleep(0.5)
            state = (await http.get(f"/jobs/{job['id']}")).json()
            assert state["state"] == "available", state  # given back, not leased to nobody
            assert state["attempts"] == 0 and state["reserved_by"] is None
            taken = (await http.post("/leases", json={"worker_id": "w", "names": ["a"]})).json()
            assert [lease["job"]["id"] for lease in taken["leases"]] == [job["id"]]


async def until_waiting(http: httpx.AsyncClient, count: int, within_s: float) -> None:
    """Until the server's own gauge of parked long polls reads `count`."""
    deadline = time.monotonic() + within_s
    while (now := value(await scrape(http), "bgjobs_long_polls_waiting")) != count:
        assert time.monotonic() < deadline, f"{now:.0f} polls waiting, expected {count}"
        await asyncio.sleep(0.05)


async def test_polls_whose_clients_left_stop_waiting_at_once(
    server_process: Any, db_url: str
) -> None:
    """A parked poll whose client hangs up ends then, not when its wait_ms runs out: it
    gives back its place among BGJOBS_MAX_WAITING_POLLS, and no job is handed to it. Five
    rounds of 20 polls that fill every place, each with a 60 s wait."""
    with server_process(database_url=db_url, env={"BGJOBS_MAX_WAITING_POLLS": "20"}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for round_ in range(5):
                clients = [httpx.AsyncClient(base_url=server.url, timeout=90) for _ in range(20)]
                polls = [
                    asyncio.create_task(
                        client.post(
                            "/leases",
                            json={"worker_id": f"w{i}", "names": ["idle"], "wait_ms": 60_000},
                        )
                    )
                    for i, client in enumerate(clients)
                ]
                await until_waiting(http, 20, within_s=10)
                for poll in polls:
                    poll.cancel()
                for client in clients:
                    await client.aclose()
                await until_waiting(http, 0, within_s=5)  # not in 60 s
                assert all(poll.cancelled() for poll in polls), round_
            job = await enqueue(http, name="idle")
            state = (await http.get(f"/jobs/{job['id']}")).json()
            assert state["state"] == "available" and state["attempts"] == 0, state
            # Every place is free again: 20 new polls are admitted (none is refused with
            # a 503), and the first one takes the job.
            polls = [
                asyncio.create_task(
                    http.post("/leases", json={"worker_id": "w", "names": ["idle"], "wait_ms": 300})
                )
                for _ in range(20)
            ]
            answers = await asyncio.gather(*polls)
            assert [a.status_code for a in answers] == [200] * 20
            leased = [lease["job"]["id"] for a in answers for lease in a.json()["leases"]]
            assert leased == [job["id"]]


@pytest.mark.parametrize("launcher", ["bgjobs", "uvicorn"])
async def test_sigterm_answers_100_open_long_polls_and_exits_promptly(
    server_process: Any, db_url: str, launcher: str
) -> None:
    """Under `bgjobs serve` and under a bare `uvicorn app.main:app` alike."""
    with server_process(database_url=db_url, launcher=launcher) as server:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=90, limits=limits) as http:
            body = {"worker_id": "w", "names": ["idle"], "wait_ms": 60_000}
            polls = [asyncio.create_task(http.post("/leases", json=body)) for _ in range(100)]
            await asyncio.sleep(1.5)
            assert not any(poll.done() for poll in polls)
            started = time.monotonic()
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*polls), 30)
            await asyncio.to_thread(server.process.wait, 30)
            took = time.monotonic() - started
        print(
            f"\nSIGTERM ({launcher}) with 100 open long polls: all answered, exit in {took:.2f} s"
        )
        assert [a.status_code for a in answers] == [200] * 100
        assert all(a.json() == {"leases": []} for a in answers)
        assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises it
        assert took < 5
