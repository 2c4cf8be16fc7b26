"""GET /events against a real server process: order, the name filter, resuming with
Last-Event-ID (and reset), coalescing, the subscriber cap, a slow reader dropped, and
SIGTERM ending every stream."""

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess


@pytest.fixture
def server(server_process: Any, db_url: str) -> Iterator[ServerProcess]:
    with server_process(db_url, env={"BGJOBS_MAX_EVENT_STREAMS": "3"}) as running:
        yield running


class Stream:
    """Reads an event stream on a thread, parsing SSE frames as they come."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(5, read=60))
        self._thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                self.status = response.status_code
                frame: dict[str, Any] = {}
                for line in response.iter_lines():
                    if not line:
                        if "event" in frame:
                            self.events.append(frame)
                        frame = {}
                        continue
                    key, _, value = line.partition(": ")
                    frame[key] = json.loads(value) if key == "data" else value
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def wait(self, check: Any, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not check(self):
            assert time.monotonic() < deadline, f"not reached; events: {self.events[-5:]}"
            time.sleep(0.02)

    def changes(self) -> list[tuple[str, str]]:
        return [
            (e["data"]["name"], e["data"]["change"]) for e in self.events if e["event"] == "job"
        ]

    def close(self) -> None:
        self._client.close()
        self._thread.join(timeout=1)  # a read blocked until the next event ends with the server


def post(server: ServerProcess, path: str, body: Any = None) -> Any:
    response = httpx.post(f"{server.url}{path}", json=body)
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


def test_changes_arrive_in_order_and_filtered_by_name(server: ServerProcess) -> None:
    everything = Stream(f"{server.url}/events")
    only_a = Stream(f"{server.url}/events?name=a")
    everything.wait(lambda s: any(e["event"] == "stats" for e in s.events))
    only_a.wait(lambda s: s.status == 200)
    job = post(server, "/jobs", {"name": "a", "payload": "x", "max_retries": 0})
    post(server, "/jobs", {"name": "b", "payload": "y"})
    (lease,) = post(server, "/leases", {"worker_id": "w", "names": ["a"]})["leases"]
    post(server, f"/leases/{lease['id']}/fail", {"exception": "boom"})
    post(server, f"/jobs/{job['id']}/retry")
    only_a.wait(lambda s: len(s.changes()) == 4)
    assert only_a.changes() == [
        ("a", "enqueued"),
        ("a", "leased"),
        ("a", "failed"),
        ("a", "retried"),
    ]
    everything.wait(lambda s: len(s.changes()) == 5)
    assert ("b", "enqueued") in everything.changes()
    first = next(e for e in everything.events if e["event"] == "job")
    assert first["data"] == {
        "id": job["id"], "name": "a", "change": "enqueued", "state": "available",
        "at": first["data"]["at"],
    }  # fmt: skip
    assert first["data"]["at"].endswith("Z")
    ids = [e["id"] for e in everything.events if e["event"] == "job"]
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == sorted(int(i.rsplit("-", 1)[1]) for i in ids)
    everything.close()
    only_a.close()


def test_delete_events_carry_the_name(server: ServerProcess) -> None:
    """A stream filtered by name sees that name's deletes too: one by one, in bulk by ids
    and in bulk by filter, with and without a name (the name is read before the delete,
    which leaves no row to tell it)."""
    only_a = Stream(f"{server.url}/events?name=a")
    only_b = Stream(f"{server.url}/events?name=b")
    only_a.wait(lambda s: s.status == 200)
    only_b.wait(lambda s: s.status == 200)
    a = [post(server, "/jobs", {"name": "a", "payload": str(i)})["id"] for i in range(4)]
    post(server, "/jobs", {"name": "b", "payload": "y"})
    assert httpx.delete(f"{server.url}/jobs/{a[0]}").status_code == 204
    post(server, "/jobs/delete", {"ids": [a[1]]})
    post(server, "/jobs/delete", {"filter": {"state": "available", "name": "a"}})
    post(server, "/jobs/delete", {"filter": {"state": "available"}})  # b's job, no name given
    only_a.wait(lambda s: len(s.changes()) == 8)
    assert only_a.changes() == [("a", "enqueued")] * 4 + [("a", "deleted")] * 4
    deleted = [e["data"]["id"] for e in only_a.events if e["event"] == "job"][4:]
    assert sorted(deleted) == sorted(a)
    only_b.wait(lambda s: len(s.changes()) == 2)
    assert only_b.changes() == [("b", "enqueued"), ("b", "deleted")]
    only_a.close()
    only_b.close()


def test_resume_with_last_event_id_and_reset(server: ServerProcess) -> None:
    first = Stream(f"{server.url}/events")
    first.wait(lambda s: s.status == 200)
    post(server, "/jobs", {"name": "r", "payload": "1"})
    first.wait(lambda s: len(s.changes()) == 1)
    last_id = [e["id"] for e in first.events if "id" in e][-1]  # stats events carry none
    first.close()
    post(server, "/jobs", {"name": "r", "payload": "2"})
    post(server, "/jobs", {"name": "r", "payload": "3"})
    resumed = Stream(f"{server.url}/events", {"Last-Event-ID": last_id})
    resumed.wait(lambda s: len(s.changes()) == 2)
    assert [e["event"] for e in resumed.events if e["event"] != "stats"] == ["job", "job"]
    resumed.close()
    stranger = Stream(f"{server.url}/events", {"Last-Event-ID": "deadbeef-12"})
    stranger.wait(lambda s: any(e["event"] == "reset" for e in s.events))
    stranger.close()


def test_a_burst_is_coalesced(server: ServerProcess) -> None:
    stream = Stream(f"{server.url}/events")
    stream.wait(lambda s: s.status == 200)
    post(server, "/jobs/batch", {"jobs": [{"name": "c", "payload": str(i)} for i in range(500)]})
    stream.wait(lambda s: any(e["event"] == "coalesced" for e in s.events))
    (burst,) = [e for e in stream.events if e["event"] == "coalesced"]
    assert burst["data"] == {"count": 500, "changes": {"enqueued": 500}}
    stream.close()


def test_the_subscriber_cap_and_tokens_in_queries(server: ServerProcess) -> None:
    streams = [Stream(f"{server.url}/events") for _ in range(3)]
    for stream in streams:
        stream.wait(lambda s: s.status == 200)
    refused = httpx.get(f"{server.url}/events")
    assert refused.status_code == 503 and "event streams are open" in refused.json()["detail"]
    for stream in streams:
        stream.close()
    in_query = httpx.get(f"{server.url}/events", params={"token": "t"})
    assert in_query.status_code == 401 and "query strings are refused" in in_query.json()["detail"]


def test_a_reader_that_stops_reading_is_dropped(server_process: Any, db_url: str) -> None:
    """A client with a tiny receive buffer that never reads: the server drops it instead
    of buffering, and its slot (the only one) goes to the next subscriber."""
    env = {"BGJOBS_MAX_EVENT_STREAMS": "1"}
    with server_process(db_url, env=env) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        name = "n" * 255  # big frames, fewer than a burst's worth per flush: sent one by one
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=server.url) as client:
            while slot_taken(client):  # until the stalled reader is dropped
                assert time.monotonic() < deadline, "the stalled reader was never dropped"
                for _ in range(100):
                    client.post("/jobs", json={"name": name, "payload": ""})
        sock.close()


def slot_taken(client: httpx.Client) -> bool:
    with client.stream("GET", "/events", timeout=5) as response:
        return response.status_code == 503


def test_sigterm_ends_every_stream(server_process: Any, db_url: str) -> None:
    with server_process(db_url) as server:
        streams = [Stream(f"{server.url}/events") for _ in range(2)]
        for stream in streams:
            stream.wait(lambda s: s.status == 200)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        for stream in streams:
            assert stream.ended.wait(10), "a stream outlived SIGTERM"
        assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises it
