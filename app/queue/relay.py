"""Job changes across replicas: what one replica publishes reaches the event streams that
are open on the others (on PostgreSQL, where several replicas share one database).

- Only while someone watches. A replica with open streams says so at once and then every
  WATCH_EVERY_S; the others forward their changes until WATCH_TTL_S after the last word.
  With no dashboard open anywhere, publishing costs what it did, and nothing is sent.
- Batched. Changes gather for FLUSH_S, then go as few messages as fit in PAYLOAD_BYTES
  (PostgreSQL's NOTIFY takes under 8,000 bytes).
- Bounded. Past MAX_FORWARD changes in one flush the rest go as counts per name and
  change, which the receivers publish as `coalesced` events: a burst of a million jobs
  costs a handful of messages, not a million.
- Lossy, visibly. Messages sent while a receiver's listening link was down are lost, and
  so are changes a sender could not send; either way the receivers' streams get a
  `reset` (reload), as when a resume reaches too far back.

Wire format, one message each: `<sender>|w|` (I watch), `<sender>|e|<json list of [id,
name, change, state, at]>`, `<sender>|o|<json {name: {change: count}}>`, `<sender>|r|`
(changes of mine were lost: reload).
"""

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime

import orjson

from app.queue.events import EventHub

log = logging.getLogger("bgjobs.queue.relay")

WATCH_EVERY_S = 5.0
WATCH_TTL_S = 15.0
FLUSH_S = 0.1
PAYLOAD_BYTES = 7_900
MAX_FORWARD = 500

Broadcast = Callable[[list[str]], Awaitable[None]]


class EventRelay:
    """Forwards this replica's changes to the others while they watch, and publishes
    theirs into this replica's hub."""

    def __init__(self, hub: EventHub, broadcast: Broadcast) -> None:
        self._hub = hub
        self._broadcast = broadcast
        self._sender = os.urandom(6).hex()
        self._outbox: list[bytes] = []
        self._overflow: dict[str, Counter[str]] = {}
        self._watched_until = 0.0
        self._flushing: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._failing = False
        hub.on_first_subscriber = self._watching

    # -- watching: tell the others while streams are open here ----------------------------

    def _watching(self) -> None:
        if self._heartbeat is None:
            self._beat()

    def _beat(self) -> None:
        if not self._hub.subscribers:
            self._heartbeat = None
            return
        self._send([f"{self._sender}|w|"])
        self._heartbeat = asyncio.get_running_loop().call_later(WATCH_EVERY_S, self._beat)

    # -- outgoing -----------------------------------------------------------------------

    def _outgoing(self, job_id: str, name: str, change: str, state: str, at: datetime) -> None:
        if len(self._outbox) < MAX_FORWARD:
            self._outbox.append(orjson.dumps([job_id, name, change, state, at.isoformat()]))
        else:
            self._overflow.setdefault(name, Counter())[change] += 1
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        if asyncio.get_running_loop().time() > self._watched_until:
            self._hub.forward = None  # nobody has said they watch for a while: stop
        # Counts as `"name":{...}` members of one JSON object.
        counts = [orjson.dumps({n: dict(c)})[1:-1] for n, c in self._overflow.items()]
        payloads = self._pack("e", b"[", self._outbox, b"]") + self._pack("o", b"{", counts, b"}")
        self._outbox, self._overflow = [], {}
        if payloads:
            self._send(payloads)

    def _pack(self, kind: str, start: bytes, items: list[bytes], end: bytes) -> list[str]:
        """The items as comma-separated members between `start` and `end`, in as few
        messages as keep each under PAYLOAD_BYTES."""
        head = f"{self._sender}|{kind}|".encode() + start
        payloads: list[str] = []
        parts: list[bytes] = []
        size = len(head) + len(end)
        for item in items:
            if parts and size + len(item) + 1 > PAYLOAD_BYTES:
                payloads.append((head + b",".join(parts) + end).decode())
                parts, size = [], len(head) + len(end)
            parts.append(item)
            size += len(item) + 1
        if parts:
            payloads.append((head + b",".join(parts) + end).decode())
        return payloads

    def _send(self, payloads: list[str]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(payloads))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _deliver(self, payloads: list[str]) -> None:
        if self._failing:  # changes were lost meanwhile: the others' streams must reload
            payloads = [f"{self._sender}|r|", *payloads]
        try:
            await self._broadcast(payloads)
        except Exception as exc:  # the link is down: the others will see a reset
            if not self._failing:  # once per outage, not once per flush
                log.warning("cannot forward job changes to other replicas: %s", exc)
            self._failing = True
            return
        if self._failing:
            log.info("forwarding job changes to other replicas again")
            self._failing = False

    # -- incoming -----------------------------------------------------------------------

    def received(self, payload: str) -> None:
        """A message from any replica (this one's own included, which it skips)."""
        sender, kind, body = payload.split("|", 2)
        if sender == self._sender:
            return
        hub = self._hub
        if kind == "w":
            self._watched_until = asyncio.get_running_loop().time() + WATCH_TTL_S
            hub.forward = self._outgoing
        elif kind == "e":
            for job_id, name, change, state, at in orjson.loads(body):
                hub.publish_remote(job_id, name, change, state, datetime.fromisoformat(at))
        elif kind == "o":
            for name, changes in orjson.loads(body).items():
                hub.publish_counts(name, changes)
        elif kind == "r":
            hub.reset()

    def gap(self) -> None:
        """The listening link was down: what others sent meanwhile is lost."""
        if self._hub.subscribers:
            self._hub.reset()

    def close(self) -> None:
        for handle in (self._flushing, self._heartbeat):
            if handle is not None:
                handle.cancel()
        for task in self._sends:
            task.cancel()
