"""Workers in bulk: batch ack, fail and extend, fenced item by item; why each 409 happened
(its `code`), on single and batch calls; and leasing up to 1,000 jobs at once."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from app.settings import Settings
from tests.conftest import enqueue, lease

TOKENS = "p1=enqueue,w1=work,r1=read,a1=read+admin"
UNKNOWN = "zzz.1"  # well formed, never issued
MALFORMED = "nodot"  # the server cannot have issued it
ACTIONS = (  # every single call a lease id answers: (method, path after the id, body)
    ("POST", "ack", None),
    ("POST", "fail", {"exception": "x"}),
    ("POST", "extend", {"lease_ms": 5000}),
    ("DELETE", "", None),
)


@pytest.fixture
def settings(db_url: str, request: pytest.FixtureRequest) -> Settings:
    """conftest's settings; a test changes some with
    `@pytest.mark.parametrize("settings", [{...}], indirect=True)`."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    return Settings(database_url=db_url, reaper_interval_ms=50, poll_recheck_ms=1000, **overrides)


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


async def get_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def held(client: httpx.AsyncClient, name: str, **fields: Any) -> dict[str, Any]:
    """A live lease on a new job of its own name."""
    await enqueue(client, name=name, payload=f"payload of {name}", **fields)
    leases = await lease(client, [name])
    assert len(leases) == 1
    return leases[0]


async def call(client: httpx.AsyncClient, path: str, body: Any) -> list[dict[str, Any]]:
    """A batch call that must answer 200 with `{"results": [...]}`."""
    response = await client.post(f"/leases/{path}", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"results"}, answer
    results: list[dict[str, Any]] = answer["results"]
    return results


async def single(
    client: httpx.AsyncClient, method: str, lease_id: str, path: str, body: Any
) -> httpx.Response:
    url = f"/leases/{lease_id}/{path}".rstrip("/")
    return await client.request(method, url, json=body)


def assert_refused(item: dict[str, Any], lease_id: str, status: int, code: str) -> None:
    """A batch item refused as the single call would be, with its machine-readable code."""
    assert item["id"] == lease_id, item
    assert (item["status"], item["code"]) == (status, code), item
    assert isinstance(item["detail"], str) and item["detail"], item
    assert set(item) - {"job"} == {"id", "status", "code", "detail"}, item


def assert_conflict(response: httpx.Response, code: str) -> dict[str, Any]:
    """A single call's 409, with its code."""
    assert response.status_code == 409, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert set(body) - {"job"} == {"detail", "code"}, body
    return body


def assert_validation_error(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail", "errors"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["errors"] and all(set(e) == {"loc", "msg", "type"} for e in body["errors"])


@dataclass
class Stale:
    """One stale lease per 409 code, each on a job of that name:

    - finished_by_this_lease: acked with this very lease (`finished` is the job then);
    - finished_by_another_lease: expired, the job leased again and acked under `later`;
    - leased_again: expired, the job leased again and still reserved under `later`;
    - released: given back with DELETE /leases/{id};
    - expired: expired and the job put back, not leased since.
    """

    leases: dict[str, dict[str, Any]]
    later: dict[str, dict[str, Any]]
    finished: dict[str, Any]

    def id(self, code: str) -> str:
        lease_id: str = self.leases[code]["id"]
        return lease_id

    def job_id(self, code: str) -> str:
        job_id: str = self.leases[code]["job"]["id"]
        return job_id


async def stale_leases(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> Stale:
    """Moves the clock 7 s on: leases taken before with the default 30 s stay live."""
    expiring = ("finished_by_another_lease", "leased_again", "expired")
    leases = {code: await held(client, code) for code in ("finished_by_this_lease", "released")}
    for code in expiring:
        await enqueue(client, name=code, payload=f"payload of {code}")
        leases[code] = (await lease(client, [code], lease_ms=1000))[0]
    acked = await client.post(f"/leases/{leases['finished_by_this_lease']['id']}/ack")
    assert acked.status_code == 200, acked.text
    assert (await client.delete(f"/leases/{leases['released']['id']}")).status_code == 204
    clock.advance(timedelta(seconds=2))
    await service.reap_expired()
    clock.advance(timedelta(seconds=5))  # past the backoff
    for code in expiring:
        job = await get_job(client, leases[code]["job"]["id"])
        assert job["state"] == "available" and job["attempts"] == 1, job
    later = {code: (await lease(client, [code]))[0] for code in expiring[:2]}
    for code, entry in later.items():
        assert entry["job"]["id"] == leases[code]["job"]["id"] and entry["id"] != leases[code]["id"]
    done = await client.post(f"/leases/{later['finished_by_another_lease']['id']}/ack")
    assert done.status_code == 200, done.text
    return Stale(leases, later, acked.json())


# -- the 409 codes on single calls ------------------------------------------------------


async def test_repeated_ack_or_fail_is_409_finished_by_this_lease_with_the_job(
    client: httpx.AsyncClient,
) -> None:
    ok = await held(client, "ok")
    bad = await held(client, "bad", max_retries=0)
    acked = await client.post(f"/leases/{ok['id']}/ack")
    assert acked.status_code == 200, acked.text
    failed = await client.post(f"/leases/{bad['id']}/fail", json={"exception": "boom"})
    assert failed.status_code == 200 and failed.json()["outcome"] == "failed", failed.text
    for lease_id, job in ((ok["id"], acked.json()), (bad["id"], failed.json()["job"])):
        for path, body in (("ack", None), ("fail", {"exception": "again", "retry_in_ms": 0})):
            response = await client.post(f"/leases/{lease_id}/{path}", json=body)
            answer = assert_conflict(response, "finished_by_this_lease")
            assert set(answer) == {"detail", "code", "job"}
            assert answer["job"] == job
            assert await get_job(client, job["id"]) == job


async def test_extend_or_release_of_a_finished_lease_is_409_finished_by_this_lease(
    client: httpx.AsyncClient,
) -> None:
    ok = await held(client, "ok")
    job = (await client.post(f"/leases/{ok['id']}/ack")).json()
    for method, path, body in ACTIONS[2:]:
        answer = assert_conflict(
            await single(client, method, ok["id"], path, body), "finished_by_this_lease"
        )
        if "job" in answer:
            assert answer["job"] == job
    assert await get_job(client, job["id"]) == job


async def test_a_lease_whose_job_finished_under_a_later_lease_is_409_finished_by_another_lease(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    code = "finished_by_another_lease"
    before = await get_job(client, stale.job_id(code))
    assert before["state"] == "succeeded"
    for method, path, body in ACTIONS:
        assert_conflict(await single(client, method, stale.id(code), path, body), code)
    assert await get_job(client, stale.job_id(code)) == before


async def test_a_lease_taken_over_is_409_leased_again_and_changes_nothing(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    code = "leased_again"
    before = await get_job(client, stale.job_id(code))
    assert before["state"] == "reserved"
    for method, path, body in ACTIONS:
        assert_conflict(await single(client, method, stale.id(code), path, body), code)
    assert await get_job(client, stale.job_id(code)) == before
    fresh = await client.post(f"/leases/{stale.later[code]['id']}/ack")
    assert fresh.status_code == 200, fresh.text


async def test_a_released_lease_is_409_released(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    before = await get_job(client, stale.job_id("released"))
    assert before["state"] == "available" and before["attempts"] == 0
    for method, path, body in ACTIONS:
        assert_conflict(await single(client, method, stale.id("released"), path, body), "released")
    assert await get_job(client, stale.job_id("released")) == before


async def test_an_expired_lease_put_back_is_409_expired_yet_a_late_ack_still_lands(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    before = await get_job(client, stale.job_id("expired"))
    for method, path, body in ACTIONS[2:]:
        assert_conflict(await single(client, method, stale.id("expired"), path, body), "expired")
    assert await get_job(client, stale.job_id("expired")) == before
    late = await client.post(f"/leases/{stale.id('expired')}/ack")
    assert late.status_code == 200, late.text
    assert (await get_job(client, stale.job_id("expired")))["state"] == "succeeded"


# -- batch ack ----------------------------------------------------------------------------


async def test_batch_ack_acks_each_lease_and_answers_in_request_order(
    client: httpx.AsyncClient,
) -> None:
    for i in range(3):
        await enqueue(client, payload=f"p{i}")
    leases = await lease(client, max_jobs=3)
    ids = [entry["id"] for entry in reversed(leases)]
    results = await call(client, "ack", {"ids": ids})
    assert [item["id"] for item in results] == ids
    for item, entry in zip(results, reversed(leases), strict=True):
        assert set(item) == {"id", "status", "job"}, item
        assert item["status"] == 200
        job = item["job"]
        assert job["state"] == "succeeded" and job["id"] == entry["job"]["id"]
        assert job["payload"] == entry["job"]["payload"] and job["attempts"] == 1
        assert await get_job(client, job["id"]) == job
    assert (await client.get("/jobs")).json()["items"] == []
    history = (await client.get("/jobs/succeeded")).json()["items"]
    assert sorted(j["id"] for j in history) == sorted(e["job"]["id"] for e in leases)


async def test_batch_ack_fences_each_item_on_its_own(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    good1 = await held(client, "good1")
    good2 = await held(client, "good2")
    stale = await stale_leases(client, clock, service)
    taken = await get_job(client, stale.job_id("leased_again"))
    ids = [good1["id"], UNKNOWN, stale.id("leased_again"), good2["id"], MALFORMED]
    results = await call(client, "ack", {"ids": ids})
    assert [item["id"] for item in results] == ids
    assert [item["status"] for item in results] == [200, 404, 409, 200, 404]
    assert_refused(results[1], UNKNOWN, 404, "not_found")
    assert_refused(results[2], stale.id("leased_again"), 409, "leased_again")
    assert_refused(results[4], MALFORMED, 404, "not_found")
    for item, entry in ((results[0], good1), (results[3], good2)):
        assert set(item) == {"id", "status", "job"}, item
        assert item["job"]["id"] == entry["job"]["id"]
        assert item["job"]["state"] == "succeeded"
        assert await get_job(client, entry["job"]["id"]) == item["job"]
    assert await get_job(client, stale.job_id("leased_again")) == taken
    fresh = await client.post(f"/leases/{stale.later['leased_again']['id']}/ack")
    assert fresh.status_code == 200, fresh.text


async def test_batch_ack_names_the_code_of_each_stale_lease(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    codes = ["finished_by_this_lease", "finished_by_another_lease", "leased_again", "released"]
    before = {code: await get_job(client, stale.job_id(code)) for code in codes}
    ids = [stale.id(code) for code in codes] + [stale.id("expired")]
    results = await call(client, "ack", {"ids": ids})
    assert [item["id"] for item in results] == ids
    for item, code in zip(results[:4], codes, strict=True):
        assert_refused(item, stale.id(code), 409, code)
        assert await get_job(client, stale.job_id(code)) == before[code]
    assert results[0]["job"] == stale.finished
    # A lease that expired is still good for an ack while nobody has leased the job since.
    late = results[4]
    assert set(late) == {"id", "status", "job"} and late["status"] == 200, late
    assert late["job"]["id"] == stale.job_id("expired") and late["job"]["state"] == "succeeded"


# -- batch fail ---------------------------------------------------------------------------


async def test_batch_fail_retries_or_buries_each_item_in_request_order(
    client: httpx.AsyncClient, clock: OffsetClock
) -> None:
    later = await held(client, "later")
    backoff = await held(client, "backoff")
    final = await held(client, "final", max_retries=0)
    items = [
        {"id": final["id"], "exception": "out of retries"},
        {"id": later["id"], "exception": "try later", "retry_in_ms": 60_000},
        {"id": backoff["id"], "exception": "default backoff"},
    ]
    results = await call(client, "fail", {"items": items})
    assert [item["id"] for item in results] == [i["id"] for i in items]
    for item in results:
        assert set(item) == {"id", "status", "outcome", "job"}, item
        assert item["status"] == 200
        assert await get_job(client, item["job"]["id"]) == item["job"]
    buried, retrying, backing_off = results
    assert buried["outcome"] == "failed" and buried["job"]["state"] == "failed"
    assert buried["job"]["id"] == final["job"]["id"]
    assert buried["job"]["exception"] == "out of retries" and buried["job"]["attempts"] == 1
    assert retrying["outcome"] == "retrying" and retrying["job"]["state"] == "scheduled"
    assert retrying["job"]["id"] == later["job"]["id"] and retrying["job"]["reserved_by"] is None
    delay = parse(retrying["job"]["available_at"]) - parse(later["job"]["reserved_at"])
    assert delay >= timedelta(seconds=60)
    assert backing_off["outcome"] == "retrying" and backing_off["job"]["attempts"] == 1
    assert backing_off["job"]["state"] == "scheduled"
    failed = (await client.get("/jobs/failed")).json()["items"]
    assert [job["id"] for job in failed] == [final["job"]["id"]]
    clock.advance(timedelta(seconds=61))
    again = await lease(client, ["later", "backoff", "final"], max_jobs=5)
    assert sorted(e["job"]["id"] for e in again) == sorted(
        [later["job"]["id"], backoff["job"]["id"]]
    )


async def test_batch_fail_fences_each_item_on_its_own(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    good1 = await held(client, "good1")
    good2 = await held(client, "good2", max_retries=0)
    stale = await stale_leases(client, clock, service)
    taken = await get_job(client, stale.job_id("leased_again"))
    ids = [good1["id"], UNKNOWN, stale.id("leased_again"), good2["id"], MALFORMED]
    items = [
        {"id": lease_id, "exception": f"e{i}", "retry_in_ms": 0} for i, lease_id in enumerate(ids)
    ]
    results = await call(client, "fail", {"items": items})
    assert [item["id"] for item in results] == ids
    assert [item["status"] for item in results] == [200, 404, 409, 200, 404]
    assert_refused(results[1], UNKNOWN, 404, "not_found")
    assert_refused(results[2], stale.id("leased_again"), 409, "leased_again")
    assert_refused(results[4], MALFORMED, 404, "not_found")
    assert results[0]["outcome"] == "retrying" and results[0]["job"]["state"] == "available"
    assert results[3]["outcome"] == "failed" and results[3]["job"]["exception"] == "e3"
    for item, entry in ((results[0], good1), (results[3], good2)):
        assert item["job"]["id"] == entry["job"]["id"]
        assert await get_job(client, entry["job"]["id"]) == item["job"]
    assert await get_job(client, stale.job_id("leased_again")) == taken


async def test_batch_fail_of_a_finished_lease_is_finished_by_this_lease_with_the_job(
    client: httpx.AsyncClient,
) -> None:
    final = await held(client, "final", max_retries=0)
    first = await call(client, "fail", {"items": [{"id": final["id"], "exception": "boom"}]})
    assert first[0]["status"] == 200 and first[0]["outcome"] == "failed", first
    dead = first[0]["job"]
    again = await call(client, "fail", {"items": [{"id": final["id"], "exception": "again"}]})
    assert_refused(again[0], final["id"], 409, "finished_by_this_lease")
    assert again[0]["job"] == dead
    acked = await call(client, "ack", {"ids": [final["id"]]})
    assert_refused(acked[0], final["id"], 409, "finished_by_this_lease")
    assert acked[0]["job"] == dead
    assert await get_job(client, dead["id"]) == dead


async def test_batch_fail_names_the_code_of_each_stale_lease(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    stale = await stale_leases(client, clock, service)
    codes = ["finished_by_this_lease", "finished_by_another_lease", "leased_again", "released"]
    before = {code: await get_job(client, stale.job_id(code)) for code in codes}
    items = [{"id": stale.id(code), "exception": "late"} for code in codes]
    results = await call(client, "fail", {"items": items})
    for item, code in zip(results, codes, strict=True):
        assert_refused(item, stale.id(code), 409, code)
        assert await get_job(client, stale.job_id(code)) == before[code]
    assert results[0]["job"] == stale.finished


# -- batch extend -------------------------------------------------------------------------


async def test_batch_extend_pushes_back_each_expiry(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    for i in range(2):
        await enqueue(client, payload=f"p{i}")
    leases = await lease(client, max_jobs=2, lease_ms=1000)
    ids = [entry["id"] for entry in leases]
    results = await call(client, "extend", {"ids": ids, "lease_ms": 60_000})
    after = clock.now()
    assert [item["id"] for item in results] == ids
    for item, entry in zip(results, leases, strict=True):
        assert set(item) == {"id", "status", "expires_at"}, item
        assert item["status"] == 200
        expires = parse(item["expires_at"])
        assert parse(entry["job"]["reserved_at"]) + timedelta(seconds=60) <= expires
        assert expires <= after + timedelta(seconds=60)
    clock.advance(timedelta(seconds=30))
    await service.reap_expired()
    for entry in leases:
        assert (await get_job(client, entry["job"]["id"]))["state"] == "reserved"
    acked = await call(client, "ack", {"ids": ids})
    assert [item["status"] for item in acked] == [200, 200]


async def test_batch_extend_fences_each_item_and_names_each_code(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    good = await held(client, "good")
    stale = await stale_leases(client, clock, service)
    codes = [
        "leased_again",
        "released",
        "expired",
        "finished_by_this_lease",
        "finished_by_another_lease",
    ]
    before = {code: await get_job(client, stale.job_id(code)) for code in codes}
    ids = [good["id"], UNKNOWN, *(stale.id(code) for code in codes), MALFORMED]
    results = await call(client, "extend", {"ids": ids, "lease_ms": 120_000})
    assert [item["id"] for item in results] == ids
    assert set(results[0]) == {"id", "status", "expires_at"} and results[0]["status"] == 200
    assert parse(results[0]["expires_at"]) >= parse(good["expires_at"]) + timedelta(seconds=90)
    assert_refused(results[1], UNKNOWN, 404, "not_found")
    for item, code in zip(results[2:7], codes, strict=True):
        assert_refused(item, stale.id(code), 409, code)
        assert await get_job(client, stale.job_id(code)) == before[code]
    assert_refused(results[7], MALFORMED, 404, "not_found")
    # The expired lease still acks: nobody has leased its job since.
    late = await call(client, "ack", {"ids": [stale.id("expired"), good["id"]]})
    assert [item["status"] for item in late] == [200, 200]


# -- input ----------------------------------------------------------------------------------


def thousand_and_one(lease_id: str) -> list[str]:
    return [lease_id, *(f"nope{i}.1" for i in range(1000))]


BAD_BODIES: list[tuple[str, Callable[[str], Any]]] = [
    ("ack", lambda lid: {"ids": [lid, lid]}),
    ("ack", lambda lid: {"ids": []}),
    ("ack", lambda lid: {"ids": thousand_and_one(lid)}),
    ("ack", lambda lid: {"ids": [lid, 1]}),
    ("ack", lambda lid: {"ids": [lid, None]}),
    ("ack", lambda lid: {"ids": lid}),
    ("ack", lambda lid: {}),
    ("ack", lambda lid: {"ids": [lid], "extra": 1}),
    ("fail", lambda lid: {"items": [{"id": lid, "exception": "a"}, {"id": lid, "exception": "b"}]}),
    ("fail", lambda lid: {"items": []}),
    ("fail", lambda lid: {"items": [{"id": i, "exception": "x"} for i in thousand_and_one(lid)]}),
    ("fail", lambda lid: {"items": [{"id": lid, "exception": "x"}, {"id": 7, "exception": "x"}]}),
    ("fail", lambda lid: {"items": [{"id": lid}]}),
    ("fail", lambda lid: {"items": [{"id": lid, "exception": "x", "extra": 1}]}),
    ("fail", lambda lid: {"items": [{"id": lid, "exception": "x"}], "extra": 1}),
    ("fail", lambda lid: {"ids": [lid]}),
    ("extend", lambda lid: {"ids": [lid, lid], "lease_ms": 5000}),
    ("extend", lambda lid: {"ids": [], "lease_ms": 5000}),
    ("extend", lambda lid: {"ids": thousand_and_one(lid), "lease_ms": 5000}),
    ("extend", lambda lid: {"ids": [lid, 1], "lease_ms": 5000}),
    ("extend", lambda lid: {"ids": [lid]}),
    ("extend", lambda lid: {"ids": [lid], "lease_ms": 5000, "extra": 1}),
]
BAD_IDS = [
    "ack-repeated-id",
    "ack-empty",
    "ack-1001",
    "ack-int-id",
    "ack-null-id",
    "ack-ids-not-a-list",
    "ack-no-ids",
    "ack-unknown-field",
    "fail-repeated-id",
    "fail-empty",
    "fail-1001",
    "fail-int-id",
    "fail-no-exception",
    "fail-unknown-item-field",
    "fail-unknown-field",
    "fail-ids-not-items",
    "extend-repeated-id",
    "extend-empty",
    "extend-1001",
    "extend-int-id",
    "extend-no-lease-ms",
    "extend-unknown-field",
]


@pytest.mark.parametrize(("path", "make_body"), BAD_BODIES, ids=BAD_IDS)
async def test_a_malformed_batch_is_422_and_changes_nothing(
    client: httpx.AsyncClient, path: str, make_body: Callable[[str], Any]
) -> None:
    live = await held(client, "live")
    before = await get_job(client, live["job"]["id"])
    assert_validation_error(await client.post(f"/leases/{path}", json=make_body(live["id"])))
    assert await get_job(client, live["job"]["id"]) == before
    assert before["state"] == "reserved"
    assert (await client.post(f"/leases/{live['id']}/ack")).status_code == 200


@pytest.mark.parametrize("path", ["ack", "fail", "extend"])
async def test_a_batch_of_a_thousand_ids_is_taken(client: httpx.AsyncClient, path: str) -> None:
    # Malformed ids need no lookup; one well-formed unknown id goes through the database.
    ids = [UNKNOWN, *(f"nope{i}" for i in range(999))]
    bodies: dict[str, Any] = {
        "ack": {"ids": ids},
        "fail": {"items": [{"id": lease_id, "exception": "x"} for lease_id in ids]},
        "extend": {"ids": ids, "lease_ms": 5000},
    }
    results = await call(client, path, bodies[path])
    assert [item["id"] for item in results] == ids
    for item, lease_id in zip(results, ids, strict=True):
        assert_refused(item, lease_id, 404, "not_found")


@pytest.mark.parametrize("settings", [{"api_tokens": TOKENS}], indirect=True, ids=["tokens"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("ack", {"ids": [UNKNOWN]}),
        ("fail", {"items": [{"id": UNKNOWN, "exception": "x"}]}),
        ("extend", {"ids": [UNKNOWN], "lease_ms": 5000}),
    ],
    ids=["ack", "fail", "extend"],
)
async def test_batch_lease_calls_need_the_work_scope(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    missing = await client.post(f"/leases/{path}", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for token in ("p1", "r1", "a1"):
        refused = await client.post(
            f"/leases/{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 403, refused.text
        assert "lacks the 'work' scope" in refused.json()["detail"]
    allowed = await client.post(
        f"/leases/{path}", json=body, headers={"Authorization": "Bearer w1"}
    )
    assert allowed.status_code == 200, allowed.text
    assert_refused(allowed.json()["results"][0], UNKNOWN, 404, "not_found")


# -- leasing many -------------------------------------------------------------------------


async def test_lease_takes_max_jobs_up_to_a_thousand(client: httpx.AsyncClient) -> None:
    ids = [(await enqueue(client, payload=f"p{i}"))["id"] for i in range(101)]
    too_many = await client.post(
        "/leases", json={"worker_id": "w", "names": ["send_email"], "max_jobs": 1001}
    )
    assert_validation_error(too_many)
    assert "max_jobs" in too_many.json()["detail"]
    leases = await lease(client, max_jobs=1000)
    assert [entry["job"]["id"] for entry in leases] == ids
    assert len({entry["id"] for entry in leases}) == 101
    acked = await call(client, "ack", {"ids": [entry["id"] for entry in leases]})
    assert [item["status"] for item in acked] == [200] * 101


@pytest.mark.parametrize("settings", [{"max_response_bytes": 4096}], indirect=True, ids=["4k"])
async def test_leases_stop_short_of_the_response_limit(client: httpx.AsyncClient) -> None:
    ids: list[str] = []
    for i in range(5):
        at = f"2020-01-01T00:00:0{i}Z"
        ids.append((await enqueue(client, payload=f"{i}" + "x" * 1999, available_at=at))["id"])
    first = await lease(client, max_jobs=5)
    assert 1 <= len(first) <= 4, [entry["job"]["id"] for entry in first]
    got = [entry["job"]["id"] for entry in first]
    assert got == ids[: len(got)]  # oldest first
    if len(first) > 1:
        assert sum(len(entry["job"]["payload"]) for entry in first) <= 4096
    left = (await client.get("/jobs", params={"state": "available"})).json()["items"]
    assert [job["id"] for job in left] == ids[len(got) :]
    assert all(job["attempts"] == 0 and job["reserved_by"] is None for job in left)
    for _ in range(5):
        if len(got) == 5:
            break
        more = await lease(client, max_jobs=5)
        assert more, "a ready job must always come back"
        got += [entry["job"]["id"] for entry in more]
    assert got == ids


@pytest.mark.parametrize("settings", [{"max_response_bytes": 4096}], indirect=True, ids=["4k"])
async def test_a_lease_over_the_response_limit_still_comes_alone(
    client: httpx.AsyncClient,
) -> None:
    big = await enqueue(client, payload="x" * 5000, available_at="2020-01-01T00:00:00Z")
    small = await enqueue(client, payload="s", available_at="2020-01-01T00:00:01Z")
    first = await lease(client, max_jobs=5)
    assert [entry["job"]["id"] for entry in first] == [big["id"]]
    assert first[0]["job"]["payload"] == "x" * 5000
    assert [entry["job"]["id"] for entry in await lease(client, max_jobs=5)] == [small["id"]]
