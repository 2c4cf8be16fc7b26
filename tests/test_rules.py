"""The pure rules: the backoff formula, lease ids, cursors, timestamps, the notifier."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from app.api.schemas import format_timestamp, parse_timestamp
from app.queue.backoff import backoff_ms
from app.queue.clock import SystemClock
from app.queue.cursor import decode_cursor, encode_cursor
from app.queue.errors import InvalidCursor
from app.queue.models import parse_lease_id
from app.queue.notifier import Notifier


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(1, 1000), (2, 2000), (3, 4000), (10, 512_000), (13, 3_600_000), (101, 3_600_000)],
)
def test_backoff_is_exponential_and_capped(attempts: int, expected: int) -> None:
    assert backoff_ms(attempts, 1000, 3_600_000, lambda: 0.5) == expected
    assert backoff_ms(attempts, 1000, 3_600_000, lambda: 0.0) == round(expected * 0.9)
    assert abs(backoff_ms(attempts, 1000, 3_600_000, lambda: 0.999999) - expected * 1.1) <= 4


def test_lease_ids_parse_only_when_the_server_could_have_issued_them() -> None:
    assert parse_lease_id("abc.1") == ("abc", 1)
    assert parse_lease_id("a.b.12") == ("a.b", 12)
    for bad in (
        "abc",
        "abc.",
        ".1",
        "abc.0",
        "abc.01",
        "abc.-1",
        "abc.²",
        "abc.1x",
        "x." + "9" * 19,
    ):
        assert parse_lease_id(bad) is None, bad


def test_cursor_round_trip_and_tampering() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    cursor = encode_cursor("failed", at, "job-1")
    assert decode_cursor("failed", cursor) == (at, "job-1")
    for bad in ("", "!!!", cursor[:-3], "W1tbW1tbW1tbW1tbW1tbXV1dXV1dXV1dXV1dXQ", "bnVsbA"):
        with pytest.raises(InvalidCursor):
            decode_cursor("failed", bad)
    with pytest.raises(InvalidCursor):
        decode_cursor("succeeded", cursor)


def test_timestamps_format_and_parse() -> None:
    moment = parse_timestamp("2026-03-04T05:06:07.1234567+01:00")
    assert format_timestamp(moment) == "2026-03-04T04:06:07.123456Z"
    assert format_timestamp(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000000Z"
    for bad in (12, "2026-03-04T05:06:07", "yesterday", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


async def test_notifier_wakes_one_waiter_per_job_in_arrival_order() -> None:
    notifier = Notifier(SystemClock())
    with notifier.waiter(["a"]) as first, notifier.waiter(["a", "b"]) as second:
        first.arm()
        second.arm()
        notifier.notify("a", 1)
        assert first.woken and not second.woken
        notifier.notify("b", 1)
        assert second.woken
        notifier.notify("a", 1)  # nobody armed: nothing to wake, nothing kept
    assert notifier._waiting == {}


async def test_a_wake_that_is_not_used_passes_on() -> None:
    notifier = Notifier(SystemClock())
    with notifier.waiter(["a"]) as stays:
        stays.arm()
        with notifier.waiter(["a"]) as leaves:
            leaves.arm()
            notifier.notify("a", 1)  # wakes `stays`, the first to arrive
            stays.arm()
            notifier.notify("a", 1)  # now wakes `leaves`...
            assert leaves.woken and not stays.woken
        assert stays.woken  # ...which left without using it, so `stays` gets it


async def test_notify_at_wakes_when_the_job_comes_due() -> None:
    clock = SystemClock()
    notifier = Notifier(clock)
    with notifier.waiter(["a"]) as waiter:
        waiter.arm()
        notifier.notify_at("a", clock.now() + timedelta(milliseconds=100))
        started = asyncio.get_running_loop().time()
        assert await waiter.wait(2)
        assert 0.08 <= asyncio.get_running_loop().time() - started < 0.5
    notifier.close()
