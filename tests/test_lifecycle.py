"""The server process as operators see it: clients that hang up, and SIGTERM."""

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import enqueue


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
