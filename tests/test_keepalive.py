"""HTTP keep-alive outlives client pools: a connection idle longer than httpx's 5 s pool
expiry (uvicorn's old default keep-alive) is still open, so a client reusing it never
races the server closing it."""

import asyncio
from typing import Any

import pytest


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_idle_connection_stays_open_past_common_pool_lifetimes(
    server_process: Any, db_url: str
) -> None:
    request = (
        b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 30\r\n\r\n{"name": "a", "payload": "xx"}'
    )
    with server_process(database_url=db_url) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for _ in range(2):
                writer.write(request)
                await writer.drain()
                status = await asyncio.wait_for(reader.readline(), 5)
                assert status.startswith(b"HTTP/1.1 201"), status
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(6)  # past uvicorn's default 5 s: it would close now
            assert not reader.at_eof()
        finally:
            writer.close()
