"""GET /events across replicas on one PostgreSQL: a stream on one server process sees the
changes made on another, in order and filtered by name; a burst arrives as counts that
add up; a lost link between them ends in a `reset` (reload), never in silence."""

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.conftest import ServerProcess
from tests.test_events import Stream, post


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture
def replicas(server_process: Any, db_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with server_process(db_url) as one, server_process(db_url) as two:
        yield one, two


def relayed(source: ServerProcess, stream: Stream) -> None:
    """Wait until `source` forwards to the stream's replica: it starts when that replica
    says a stream is open there, a moment after the stream opens."""
    stream.wait(lambda s: s.status == 200)
    deadline = time.monotonic() + 15
    while True:
        probe_id = post(source, "/jobs", {"name": "probe", "payload": "p"})["id"]
        try:
            stream.wait(
                lambda s, id_=probe_id: any(e["data"].get("id") == id_ for e in s.events), 0.5
            )
            return
        except AssertionError:
            assert time.monotonic() < deadline, "changes never reached the other replica"


def test_a_stream_on_one_replica_sees_the_changes_made_on_the_other(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    one, two = replicas
    everything = Stream(f"{two.url}/events")
    only_mail = Stream(f"{two.url}/events?name=mail")
    try:
        relayed(one, everything)
        job = post(one, "/jobs", {"name": "mail", "payload": "hi"})
        [lease] = post(one, "/leases", {"worker_id": "w", "names": ["mail"]})["leases"]
        post(one, f"/leases/{lease['id']}/ack")
        expected = [
            ("enqueued", "available"), ("leased", "reserved"), ("succeeded", "succeeded")
        ]  # fmt: skip

        def of_job(stream: Stream) -> list[tuple[str, str]]:
            return [
                (e["data"]["change"], e["data"]["state"])
                for e in stream.events
                if e["event"] == "job" and e["data"]["id"] == job["id"]
            ]

        everything.wait(lambda s: len(of_job(s)) == 3)
        only_mail.wait(lambda s: len(of_job(s)) == 3)
        assert of_job(everything) == of_job(only_mail) == expected
        assert {name for name, _ in only_mail.changes()} == {"mail"}  # no probes
        # A resume on the receiving replica covers relayed changes too.
        last = [e for e in everything.events if "id" in e][-1]["id"]
        post(one, "/jobs", {"name": "mail", "payload": "after"})
        everything.wait(lambda s: s.changes()[-1:] == [("mail", "enqueued")])
    finally:
        everything.close()
        only_mail.close()
    resumed = Stream(f"{two.url}/events", headers={"Last-Event-ID": last})
    try:
        resumed.wait(lambda s: len(s.changes()) >= 1)
        assert resumed.changes()[0] == ("mail", "enqueued")
        assert not any(e["event"] == "reset" for e in resumed.events)
    finally:
        resumed.close()


def test_a_burst_on_one_replica_arrives_as_counts_that_add_up(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """5,000 jobs in five batches: past a few hundred per flush the sender sends counts
    per name and change, not one message per job; every job is counted once."""
    one, two = replicas
    stream = Stream(f"{two.url}/events?name=bulk")
    probe = Stream(f"{two.url}/events")
    try:
        relayed(one, probe)
        for _ in range(5):
            batch = [{"name": "bulk", "payload": "x"} for _ in range(1000)]
            post(one, "/jobs/batch", {"jobs": batch})

        def enqueued(s: Stream) -> int:
            counted = Counter[str]()
            for e in s.events:
                if e["event"] == "job":
                    counted[e["data"]["change"]] += 1
                elif e["event"] == "coalesced":
                    counted.update(e["data"]["changes"])
            return counted["enqueued"]

        stream.wait(lambda s: enqueued(s) >= 5000)
        time.sleep(0.5)  # nothing more may come
        assert enqueued(stream) == 5000
        assert any(e["event"] == "coalesced" for e in stream.events)
    finally:
        stream.close()
        probe.close()


def test_a_lost_link_between_replicas_ends_in_a_reset(
    replicas: tuple[ServerProcess, ServerProcess], db_url: str
) -> None:
    """The receiving replica's LISTEN connection is cut: what was sent meanwhile is lost,
    so its streams are told to reload; then changes flow again."""
    one, two = replicas
    stream = Stream(f"{two.url}/events")
    try:
        relayed(one, stream)
        asyncio.run(cut_listeners(db_url))
        stream.wait(lambda s: any(e["event"] == "reset" for e in s.events))
        relayed(one, stream)  # and back
    finally:
        stream.close()


async def cut_listeners(db_url: str) -> None:
    dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        cut = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'bgjobs listener' AND datname = current_database()"
        )
        assert cut == 2
    finally:
        await conn.close()
