"""The event relay's protocol between two replicas' hubs, over an in-process link that
can be cut (the PostgreSQL link itself is exercised in tests/test_events_replicas.py):
changes a sender could not send end in a `reset` on the receiver, never in silence."""

import asyncio
from datetime import UTC, datetime

from app.queue.events import EventHub
from app.queue.relay import EventRelay


async def test_changes_a_sender_could_not_send_end_in_a_reset() -> None:
    hubs = (EventHub(), EventHub())
    link = {"up": True}
    relays: list[EventRelay] = []

    async def broadcast(payloads: list[str]) -> None:
        if not link["up"]:
            raise OSError("the link is down")
        for relay in relays:  # like NOTIFY: to every listener, the sender's own included
            for payload in payloads:
                relay.received(payload)

    relays += [EventRelay(hubs[0], broadcast), EventRelay(hubs[1], broadcast)]
    now = datetime.now(UTC)
    watcher = hubs[1].subscribe(None, None)  # says "I watch": replica 0 starts forwarding
    try:
        await asyncio.sleep(0.05)

        async def change(job_id: str) -> list[tuple[str, str | None]]:
            hubs[0].publish(job_id, "a", "enqueued", "available", now)
            await asyncio.sleep(0.25)  # past the 100 ms flush
            return [(e.kind, e.data.get("id")) for e in watcher.take()]

        assert await change("j1") == [("job", "j1")]
        link["up"] = False
        assert await change("j2") == []  # lost
        link["up"] = True
        assert await change("j3") == [("reset", None), ("job", "j3")]
        assert await change("j4") == [("job", "j4")]  # once only
    finally:
        hubs[1].unsubscribe(watcher)
        for relay in relays:
            relay.close()
