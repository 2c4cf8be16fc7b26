"""Producers in bulk: POST /jobs/batch enqueues up to 1,000 jobs, all or nothing."""

import asyncio
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.conftest import lease

MIB = 1024 * 1024
TOKENS = "p1=enqueue,w1=work,r1=read,a1=read+admin"


@pytest.fixture
def settings(db_url: str, request: pytest.FixtureRequest) -> Settings:
    """conftest's settings; a test changes some with
    `@pytest.mark.parametrize("settings", [{...}], indirect=True)`."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    return Settings(database_url=db_url, reaper_interval_ms=50, poll_recheck_ms=1000, **overrides)


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def item(i: int, **fields: Any) -> dict[str, Any]:
    """The i-th job of a batch: its name and payload tell it apart from the others."""
    return {"name": f"job-{i}", "payload": f'{{"n": {i}}}', **fields}


def items(count: int) -> list[dict[str, Any]]:
    return [item(i) for i in range(count)]


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def pending_ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    """Every pending job's id, walking all pages of GET /jobs."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": 500, **params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/jobs", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def enqueue_batch(
    client: httpx.AsyncClient, jobs: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    response = await client.post("/jobs/batch", json={"jobs": jobs}, headers=headers)
    assert response.status_code == 201, response.text
    created: list[dict[str, Any]] = response.json()["jobs"]
    return created


def assert_validation_error(response: httpx.Response) -> dict[str, Any]:
    """A 422 in the ValidationErrorOut shape: a detail, and errors with loc/msg/type."""
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"detail", "errors"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["errors"], body
    for error in body["errors"]:
        assert set(error) == {"loc", "msg", "type"}, error
        assert isinstance(error["loc"], list) and isinstance(error["msg"], str)
    return body


async def test_batch_returns_201_with_every_job_in_request_order(
    client: httpx.AsyncClient,
) -> None:
    jobs: list[dict[str, Any]] = [
        {"name": "send_email", "payload": "first"},
        {"name": "report.daily", "payload": "second", "available_in_ms": 60_000},
        {"name": "reminder", "payload": "third", "available_at": "2001-02-03T04:05:06Z"},
        {"name": "send_email", "payload": "fourth", "max_retries": 0},
        {"name": "z", "payload": "", "available_at": "2100-01-01T12:00:00+02:00"},
    ]
    response = await client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 201, response.text
    assert "location" not in response.headers
    body = response.json()
    assert set(body) == {"jobs"}
    created = body["jobs"]
    assert [(j["name"], j["payload"]) for j in created] == [(j["name"], j["payload"]) for j in jobs]
    assert len({j["id"] for j in created}) == len(jobs)
    assert [j["max_retries"] for j in created] == [3, 3, 3, 0, 3]
    assert [j["state"] for j in created] == [
        "available",
        "scheduled",
        "available",
        "available",
        "scheduled",
    ]
    for job in created:
        assert job["attempts"] == 0
        assert job["reserved_at"] is None and job["reserved_by"] is None
    first, later = created[0], created[1]
    assert first["available_at"] == first["created_at"]
    assert parse(later["available_at"]) - parse(later["created_at"]) == timedelta(seconds=60)
    assert created[2]["available_at"] == "2001-02-03T04:05:06.000000Z"
    assert created[4]["available_at"] == "2100-01-01T10:00:00.000000Z"
    for job in created:
        fetched = await client.get(f"/jobs/{job['id']}")
        assert fetched.status_code == 200 and fetched.json() == job


async def test_a_batch_is_committed_whole(client: httpx.AsyncClient) -> None:
    created = await enqueue_batch(client, items(50))
    assert sorted(await pending_ids(client)) == sorted(j["id"] for j in created)
    leases = await lease(client, [f"job-{i}" for i in range(50)], max_jobs=50)
    assert sorted(e["job"]["id"] for e in leases) == sorted(j["id"] for j in created)


async def test_a_batch_of_one_and_of_a_thousand_jobs(client: httpx.AsyncClient) -> None:
    one = await enqueue_batch(client, [item(0)])
    assert len(one) == 1 and one[0]["name"] == "job-0"
    thousand = await enqueue_batch(client, [item(i) for i in range(1, 1001)])
    assert [j["name"] for j in thousand] == [f"job-{i}" for i in range(1, 1001)]
    assert len({j["id"] for j in one + thousand}) == 1001
    assert sorted(await pending_ids(client)) == sorted(j["id"] for j in one + thousand)


@pytest.mark.parametrize("count", [0, 1001])
async def test_an_empty_or_too_large_batch_is_422(client: httpx.AsyncClient, count: int) -> None:
    body = assert_validation_error(await client.post("/jobs/batch", json={"jobs": items(count)}))
    assert any(error["loc"][:2] == ["body", "jobs"] for error in body["errors"]), body
    assert await pending_ids(client) == []


@pytest.mark.parametrize(
    ("index", "change", "field", "kind"),
    [
        (17, {"available_in_ms": -1}, "available_in_ms", "greater_than_equal"),
        (5, {"payload": None}, "payload", "missing"),
        (0, {"name": "no spaces"}, "name", "string_pattern_mismatch"),
        (9, {"queue": "q1"}, "queue", "extra_forbidden"),
        (19, {"max_retries": "3"}, "max_retries", "int_type"),
        (3, {"priority": 10}, "priority", "less_than_equal"),
    ],
    ids=["out-of-range", "missing", "bad-name", "unknown-field", "wrong-type", "bad-priority"],
)
async def test_an_invalid_item_is_a_422_naming_its_index_and_nothing_is_written(
    client: httpx.AsyncClient, index: int, change: dict[str, Any], field: str, kind: str
) -> None:
    jobs = [item(i) for i in range(20)]
    jobs[index] = {k: v for k, v in {**jobs[index], **change}.items() if v is not None}
    body = assert_validation_error(await client.post("/jobs/batch", json={"jobs": jobs}))
    assert [error["loc"] for error in body["errors"]] == [["body", "jobs", index, field]]
    assert body["errors"][0]["type"] == kind
    assert f"body.jobs.{index}.{field}: " in body["detail"]
    assert await pending_ids(client) == []


async def test_both_availabilities_in_one_item_is_a_422_naming_its_index(
    client: httpx.AsyncClient,
) -> None:
    jobs = [item(i) for i in range(4)]
    jobs[3] = item(3, available_at="2030-01-01T00:00:00Z", available_in_ms=5)
    body = assert_validation_error(await client.post("/jobs/batch", json={"jobs": jobs}))
    assert [error["loc"][:3] for error in body["errors"]] == [["body", "jobs", 3]]
    assert "body.jobs.3" in body["detail"] and "not both" in body["detail"]
    assert await pending_ids(client) == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"jobs": {"name": "a", "payload": "p"}},
        {"jobs": ["a"]},
        {"jobs": [item(0)], "extra": True},
        [item(0)],
    ],
    ids=["no-jobs", "jobs-not-a-list", "item-not-an-object", "unknown-field", "bare-list"],
)
async def test_a_malformed_batch_body_is_422(client: httpx.AsyncClient, body: Any) -> None:
    assert_validation_error(await client.post("/jobs/batch", json=body))
    assert await pending_ids(client) == []


async def test_a_payload_over_the_limit_is_413_naming_its_index(
    client: httpx.AsyncClient,
) -> None:
    jobs = [item(0, payload="x" * MIB), item(1), item(2), item(3, payload="é" * (MIB // 2 + 1))]
    response = await client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "jobs.3" in detail and "jobs.0" not in detail
    assert str(MIB + 2) in detail  # its size in UTF-8 bytes
    assert await pending_ids(client) == []
    at_the_limit = await enqueue_batch(client, jobs[:3])
    assert len(at_the_limit[0]["payload"]) == MIB


@pytest.mark.parametrize("settings", [{"max_request_bytes": 4096}], indirect=True, ids=["4k"])
async def test_a_body_over_the_request_limit_is_413_before_it_is_parsed(
    client: httpx.AsyncClient,
) -> None:
    jobs = [item(i, payload="x" * 500) for i in range(10)]
    jobs[4]["available_in_ms"] = -1  # invalid too, but never looked at
    response = await client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 413, response.text
    assert "4096-byte limit" in response.json()["detail"]
    assert await pending_ids(client) == []
    assert len(await enqueue_batch(client, [item(i, payload="x" * 100) for i in range(10)])) == 10


async def test_a_replay_with_the_same_key_returns_every_job_as_it_is_now(
    client: httpx.AsyncClient,
) -> None:
    jobs = [item(0), item(1), item(2)]
    first = await client.post("/jobs/batch", json={"jobs": jobs}, headers=keyed("b-1"))
    assert first.status_code == 201, first.text
    created = first.json()["jobs"]
    again = await client.post("/jobs/batch", json={"jobs": jobs}, headers=keyed("b-1"))
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert sorted(await pending_ids(client)) == sorted(j["id"] for j in created)

    leased = (await lease(client, ["job-0"]))[0]
    assert leased["job"]["id"] == created[0]["id"]
    assert (await client.post(f"/leases/{leased['id']}/ack")).status_code == 200
    assert (await client.delete(f"/jobs/{created[1]['id']}")).status_code == 204
    replay = await client.post("/jobs/batch", json={"jobs": jobs}, headers=keyed("b-1"))
    assert replay.status_code == 200, replay.text
    now = replay.json()["jobs"]
    assert len(now) == 3
    assert now[0] == (await client.get(f"/jobs/{created[0]['id']}")).json()
    assert now[0]["state"] == "succeeded" and now[0]["id"] == created[0]["id"]
    assert now[1] == {"id": created[1]["id"], "state": "deleted"}
    assert now[2] == created[2]
    assert await pending_ids(client) == [created[2]["id"]]


async def test_the_same_key_with_another_batch_is_a_422(client: httpx.AsyncClient) -> None:
    jobs = [item(0), item(1)]
    created = await enqueue_batch(client, jobs, headers=keyed("b-2"))
    for other in ([item(0)], [item(1), item(0)], [item(0), item(1, payload="else")]):
        response = await client.post("/jobs/batch", json={"jobs": other}, headers=keyed("b-2"))
        body = assert_validation_error(response)
        assert "Idempotency-Key" in body["detail"]
    assert sorted(await pending_ids(client)) == sorted(j["id"] for j in created)


async def test_batch_keys_are_apart_from_single_enqueue_keys(client: httpx.AsyncClient) -> None:
    single_body = {"name": "send_email", "payload": "p"}
    single = await client.post("/jobs", json=single_body, headers=keyed("shared"))
    assert single.status_code == 201, single.text
    many = await client.post("/jobs/batch", json={"jobs": [single_body]}, headers=keyed("shared"))
    assert many.status_code == 201, many.text
    batch_id = many.json()["jobs"][0]["id"]
    assert batch_id != single.json()["id"]
    single_again = await client.post("/jobs", json=single_body, headers=keyed("shared"))
    assert single_again.status_code == 200 and single_again.json()["id"] == single.json()["id"]
    many_again = await client.post(
        "/jobs/batch", json={"jobs": [single_body]}, headers=keyed("shared")
    )
    assert many_again.status_code == 200 and many_again.json()["jobs"][0]["id"] == batch_id
    assert sorted(await pending_ids(client)) == sorted([single.json()["id"], batch_id])


async def test_different_keys_and_no_key_make_different_batches(
    client: httpx.AsyncClient,
) -> None:
    ids: set[str] = set()
    for headers in (keyed("x"), keyed("y"), None, None):
        ids |= {job["id"] for job in await enqueue_batch(client, items(2), headers=headers)}
    assert len(ids) == 8
    assert sorted(await pending_ids(client)) == sorted(ids)


@pytest.mark.parametrize("settings", [{"api_tokens": TOKENS}], indirect=True, ids=["tokens"])
async def test_batch_enqueue_needs_the_enqueue_scope(client: httpx.AsyncClient) -> None:
    body = {"jobs": items(2)}
    missing = await client.post("/jobs/batch", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for token in ("w1", "r1", "a1"):
        refused = await client.post(
            "/jobs/batch", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 403, refused.text
        assert "lacks the 'enqueue' scope" in refused.json()["detail"]
    read = {"Authorization": "Bearer r1"}
    assert (await client.get("/jobs", headers=read)).json()["items"] == []
    allowed = await client.post("/jobs/batch", json=body, headers={"Authorization": "Bearer p1"})
    assert allowed.status_code == 201, allowed.text
    assert len((await client.get("/jobs", headers=read)).json()["items"]) == 2


async def test_500_concurrent_single_enqueues_are_all_committed(
    client: httpx.AsyncClient,
) -> None:
    answers = await asyncio.gather(
        *(client.post("/jobs", json=item(i)) for i in range(500)),
    )
    assert [a.status_code for a in answers] == [201] * 500, [
        a.text for a in answers if a.status_code != 201
    ][:3]
    assert sorted(a.json()["name"] for a in answers) == sorted(f"job-{i}" for i in range(500))
    created = {a.json()["id"] for a in answers}
    assert len(created) == 500
    listed = await pending_ids(client)
    assert len(listed) == 500 and set(listed) == created
