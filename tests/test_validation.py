"""Bad input gets a clear 4xx with a human-readable `detail`, and changes nothing.

Each malformed request is one row of a table: method, path, body, the exact status and a
substring `detail` must contain (matched case-insensitively). Every error must be JSON with a
non-empty string `detail`; every 422 must also carry `errors` entries with `loc`/`msg`/`type`
(the `ValidationErrorOut` shape the OpenAPI spec promises). After the refusals the queue is
checked unchanged: no job written, a reserved job still reserved with the same attempts.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from _pytest.mark.structures import ParameterSet
from fastapi import FastAPI

from app.main import create_app
from app.queue.clock import OffsetClock
from app.queue.cursor import encode_cursor
from app.settings import Settings
from tests.conftest import enqueue, lease

JSON = "application/json"
JSON_TYPE = {"content-type": JSON}
HEX_ID = "0123456789abcdef0123456789abcdef"
LONG_ID = "a" * 1000
MIB = 1024 * 1024
# A well-formed pending-list cursor whose job id holds a NUL character.
NUL_CURSOR = encode_cursor("pending", datetime(2026, 1, 1, tzinfo=UTC), "a\x00b")
NO_JSON: Any = object()  # "send no `json=`", so a JSON null body can still be spelled out


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """conftest's client, except that a crash comes back as a 500 response to assert on
    instead of an exception, so a failing case shows exactly what the server answered."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test") as c:
        yield c


@dataclass(frozen=True)
class Bad:
    """One malformed request and the answer it must get."""

    method: str
    path: str
    status: int
    detail: str
    json: Any = NO_JSON
    content: bytes | None = None
    headers: dict[str, str] | None = None

    async def send(self, client: httpx.AsyncClient, **ids: str) -> httpx.Response:
        """Send it; `{job}` and `{lease}` in the path are filled from `ids`."""
        kwargs: dict[str, Any] = {}
        if self.json is not NO_JSON:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
        if self.headers is not None:
            kwargs["headers"] = self.headers
        return await client.request(self.method, self.path.format(**ids), **kwargs)


def bad(
    case_id: str, method: str, path: str, status: int, detail: str, **request: Any
) -> ParameterSet:
    return pytest.param(Bad(method, path, status, detail, **request), id=case_id)


def changed(valid: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A copy of a valid body with `fields` set; a field set to NO_JSON is left out."""
    body = {**valid, **fields}
    return {key: value for key, value in body.items() if value is not NO_JSON}


def job_body(**fields: Any) -> dict[str, Any]:
    return changed({"name": "send_email", "payload": "{}"}, **fields)


def lease_body(**fields: Any) -> dict[str, Any]:
    return changed({"worker_id": "worker-1", "names": ["send_email"]}, **fields)


def assert_clear_error(response: httpx.Response, status: int, detail: str) -> None:
    """The exact status, a JSON body with a useful `detail`, and `errors` on every 422."""
    shown = (
        f"{response.request.method} {response.request.url} -> {response.status_code} "
        f"{response.text[:500]}"
    )
    assert response.status_code == status, shown
    assert response.headers.get("content-type", "").startswith("application/json"), shown
    body = response.json()
    assert isinstance(body, dict), shown
    assert isinstance(body.get("detail"), str) and body["detail"].strip(), shown
    assert detail.lower() in body["detail"].lower(), shown
    if status == 422:
        errors = body.get("errors")
        assert isinstance(errors, list) and errors, shown
        for error in errors:
            assert isinstance(error.get("loc"), list) and error["loc"], shown
            assert isinstance(error.get("msg"), str) and error["msg"], shown
            assert isinstance(error.get("type"), str) and error["type"], shown


async def all_jobs(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every job in every list: pending, succeeded and failed."""
    items: list[dict[str, Any]] = []
    for path in ("/jobs", "/jobs/succeeded", "/jobs/failed"):
        response = await client.get(path, params={"limit": 500})
        assert response.status_code == 200, response.text
        items += response.json()["items"]
    return items


async def reserved_job(client: httpx.AsyncClient) -> tuple[str, str]:
    """A job reserved by worker-1: (job id, lease id)."""
    job = await enqueue(client)
    (held,) = await lease(client)
    assert held["job"]["id"] == job["id"]
    return job["id"], held["id"]


async def get_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


GE = "Input should be greater than or equal to"
LE = "Input should be less than or equal to"
NOT_INT = "Input should be a valid integer"
PAYLOAD_HINT = "payload must be a string: encode structured data as text"
NAME_HINT = "a job name is 1..255 characters of A-Z a-z 0-9 _ . : -"
NO_BODY = "a JSON request body is required"
NOT_OBJECT = "body: must be a JSON object"
NOT_ISSUED = "was not issued by this server for this list"
UNKNOWN = "unknown field"


def post_job(case_id: str, detail: str, status: int = 422, **fields: Any) -> ParameterSet:
    """POST /jobs with a valid body changed by `fields`."""
    return bad(case_id, "POST", "/jobs", status, detail, json=job_body(**fields))


def raw_job(case_id: str, detail: str, content: bytes, content_type: str) -> ParameterSet:
    """POST /jobs with these exact bytes and Content-Type."""
    headers = {"content-type": content_type}
    return bad(case_id, "POST", "/jobs", 422, detail, content=content, headers=headers)


def post_lease(case_id: str, detail: str, **fields: Any) -> ParameterSet:
    """POST /leases with a valid body changed by `fields`: always a 422."""
    return bad(case_id, "POST", "/leases", 422, detail, json=lease_body(**fields))


def at_case(case_id: str, detail: str, available_at: object) -> ParameterSet:
    """POST /jobs with this `available_at`: always a 422."""
    return post_job(case_id, detail, available_at=available_at)


ENQUEUE_CASES = [
    raw_job("malformed-json", "malformed JSON", b'{"name": "send_email", "payload": ', JSON),
    raw_job("trailing-comma", "malformed JSON", b'{"name": "a", "payload": "{}",}', JSON),
    raw_job("nested-too-deep", "JSON", b"[" * 100_000, JSON),
    raw_job("empty-body", NO_BODY, b"", JSON),
    bad("no-body", "POST", "/jobs", 422, NO_BODY),
    raw_job("json-null", NOT_OBJECT, b"null", JSON),
    bad("json-array", "POST", "/jobs", 422, NOT_OBJECT, json=[job_body()]),
    bad("json-string", "POST", "/jobs", 422, NOT_OBJECT, json="send_email"),
    bad(
        "text-plain",
        "POST",
        "/jobs",
        415,
        "Content-Type: application/json",
        content=b'{"name": "a", "payload": "{}"}',
        headers={"content-type": "text/plain"},
    ),
    post_job("missing-name", "body.name: Field required", name=NO_JSON),
    post_job("missing-payload", "body.payload: Field required", payload=NO_JSON),
    post_job("payload-number", PAYLOAD_HINT, payload=42),
    post_job("payload-object", PAYLOAD_HINT, payload={"a": 1}),
    post_job("payload-null", PAYLOAD_HINT, payload=None),
    post_job("payload-list", PAYLOAD_HINT, payload=["a"]),
    post_job("payload-bool", PAYLOAD_HINT, payload=True),
    post_job("payload-nul", "body.payload: must not contain NUL", payload="a\x00b"),
    raw_job("payload-lone-surrogate", "body.payload", b'{"name": "a", "payload": "\\ud800"}', JSON),
    post_job("name-empty", f"body.name: {NAME_HINT}", name=""),
    post_job("name-256-chars", f"body.name: {NAME_HINT}", name="n" * 256),
    post_job("name-with-space", f"body.name: {NAME_HINT}", name="send email"),
    post_job("name-with-slash", f"body.name: {NAME_HINT}", name="mail/send"),
    post_job("name-number", "body.name: Input should be a valid string", name=7),
    post_job("typo-available-in", f"body.available_in: {UNKNOWN}", available_in=1000),
    post_job("unknown-queue", f"body.queue: {UNKNOWN}", queue="q1"),
    post_job("priority-10", "body.priority: Input should be less than or equal to 9", priority=10),
    post_job(
        "priority-negative",
        "body.priority: Input should be greater than or equal to 0",
        priority=-1,
    ),
    post_job("priority-string", "body.priority: Input should be a valid integer", priority="1"),
    post_job("name-dot", "a job name cannot be '.'", name="."),
    post_job("name-dot-dot", "a job name cannot be '..'", name=".."),
    post_job(
        "both-availabilities",
        "give either available_at or available_in_ms, not both",
        available_at="2026-12-01T09:00:00Z",
        available_in_ms=1000,
    ),
    at_case("at-naive", "has no UTC offset: add 'Z' or an offset", "2026-12-01T09:00:00"),
    at_case("at-number", "body.available_at: must be an RFC 3339 timestamp", 1764579600),
    at_case("at-garbage", "is not an RFC 3339 timestamp", "next tuesday"),
    at_case("at-date-only", "is not an RFC 3339 timestamp", "2026-12-01"),
    at_case("at-year-10000", "body.available_at", "10000-01-01T00:00:00Z"),
    at_case("at-year-0", "years 0001..9999", "0000-01-01T00:00:00Z"),
    at_case("at-offset-underflow", "years 0001..9999", "0001-01-01T00:00:00+14:00"),
    at_case("at-offset-overflow", "years 0001..9999", "9999-12-31T23:59:59-14:00"),
    at_case("at-month-13", "body.available_at", "2026-13-01T00:00:00Z"),
    at_case("at-feb-30", "body.available_at", "2026-02-30T00:00:00Z"),
    post_job("in-ms-negative", f"body.available_in_ms: {GE} 0", available_in_ms=-1),
    post_job(
        "in-ms-over-a-year",
        f"body.available_in_ms: {LE} 31536000000",
        available_in_ms=31_536_000_001,
    ),
    post_job("in-ms-string", f"body.available_in_ms: {NOT_INT}", available_in_ms="100"),
    post_job("in-ms-true", f"body.available_in_ms: {NOT_INT}", available_in_ms=True),
    post_job("in-ms-float", f"body.available_in_ms: {NOT_INT}", available_in_ms=1.5),
    post_job("max-retries-negative", f"body.max_retries: {GE} 0", max_retries=-1),
    post_job("max-retries-101", f"body.max_retries: {LE} 100", max_retries=101),
    post_job("max-retries-string", f"body.max_retries: {NOT_INT}", max_retries="3"),
    post_job("max-retries-true", f"body.max_retries: {NOT_INT}", max_retries=True),
    post_job("max-retries-null", f"body.max_retries: {NOT_INT}", max_retries=None),
    post_job(
        "payload-1mib-plus-1-byte",
        f"payload is {MIB + 1} bytes of UTF-8; the limit is {MIB} bytes",
        status=413,
        payload="x" * (MIB + 1),
    ),
    post_job(  # fewer characters than the limit, but more bytes
        "payload-multibyte-over-limit",
        f"payload is {MIB + 2} bytes of UTF-8",
        status=413,
        payload="é" * (MIB // 2 + 1),
    ),
    bad("put-on-jobs", "PUT", "/jobs", 405, "Method Not Allowed", json=job_body()),
]

LEASE_CASES = [
    bad(
        "malformed-json", "POST", "/leases", 422, "malformed JSON", content=b"{", headers=JSON_TYPE
    ),
    bad("no-body", "POST", "/leases", 422, NO_BODY),
    post_lease("missing-worker-id", "body.worker_id: Field required", worker_id=NO_JSON),
    post_lease("empty-worker-id", "body.worker_id: String should have at least 1", worker_id=""),
    post_lease(
        "256-char-worker-id", "body.worker_id: String should have at most 255", worker_id="w" * 256
    ),
    post_lease("worker-id-nul", "body.worker_id: must not contain NUL", worker_id="w\x00"),
    post_lease("worker-id-number", "body.worker_id: Input should be a valid string", worker_id=1),
    post_lease("missing-names", "body.names: Field required", names=NO_JSON),
    post_lease("names-empty", "body.names: List should have at least 1", names=[]),
    post_lease("names-invalid-name", f"body.names.1: {NAME_HINT}", names=["ok", "bad name"]),
    post_lease("101-names", "body.names: List should have at most 100", names=["n"] * 101),
    post_lease("names-string", "body.names: Input should be a valid array", names="send_email"),
    post_lease("max-jobs-0", f"body.max_jobs: {GE} 1", max_jobs=0),
    post_lease("max-jobs-1001", f"body.max_jobs: {LE} 1000", max_jobs=1001),
    post_lease("wait-ms-negative", f"body.wait_ms: {GE} 0", wait_ms=-1),
    post_lease("wait-ms-60001", f"body.wait_ms: {LE} 60000", wait_ms=60_001),
    post_lease("lease-ms-999", f"body.lease_ms: {GE} 1000", lease_ms=999),
    post_lease("lease-ms-over-a-day", f"body.lease_ms: {LE} 86400000", lease_ms=86_400_001),
    post_lease("lease-ms-string", f"body.lease_ms: {NOT_INT}", lease_ms="30000"),
    post_lease("typo-max-job", f"body.max_job: {UNKNOWN}", max_job=5),
]

FAIL = "/leases/abc.1/fail"  # nobody holds abc.1: the body is judged before the lease
EXTEND = "/leases/abc.1/extend"
BOOM = {"exception": "boom"}
LEASE_MS = {"lease_ms": 60_000}


def fail_case(case_id: str, detail: str, path: str = FAIL, **fields: Any) -> ParameterSet:
    """POST .../fail with a valid body changed by `fields`: always a 422."""
    return bad(case_id, "POST", path, 422, detail, json=changed(BOOM, **fields))


def extend_case(case_id: str, detail: str, path: str = EXTEND, **fields: Any) -> ParameterSet:
    """POST .../extend with a valid body changed by `fields`: always a 422."""
    return bad(case_id, "POST", path, 422, detail, json=changed(LEASE_MS, **fields))


LEASE_BODY_CASES = [
    bad("fail-no-body", "POST", FAIL, 422, NO_BODY),
    fail_case("fail-missing-exception", "body.exception: Field required", exception=NO_JSON),
    fail_case("fail-exception-nul", "body.exception: must not contain NUL", exception="x\x00"),
    fail_case("fail-exception-number", "body.exception: Input should be a valid", exception=5),
    fail_case("fail-exception-64kib-chars", "body.exception", exception="x" * 65_537),
    fail_case("fail-exception-64kib-utf8", "over 64 KiB of UTF-8", exception="é" * 32_769),
    fail_case("fail-retry-in-ms-negative", f"body.retry_in_ms: {GE} 0", retry_in_ms=-1),
    fail_case(
        "fail-retry-in-ms-too-big", f"body.retry_in_ms: {LE} 2592000000", retry_in_ms=2_592_000_001
    ),
    fail_case("fail-retry-in-ms-string", f"body.retry_in_ms: {NOT_INT}", retry_in_ms="5000"),
    bad("extend-no-body", "POST", EXTEND, 422, NO_BODY),
    extend_case("extend-lease-ms-0", f"body.lease_ms: {GE} 1000", lease_ms=0),
    extend_case("extend-lease-ms-string", f"body.lease_ms: {NOT_INT}", lease_ms="60000"),
    extend_case("extend-typo-lease", f"body.lease: {UNKNOWN}", lease_ms=NO_JSON, lease=60_000),
]

LIST_CASES = [
    bad("limit-0", "GET", "/jobs?limit=0", 422, f"query.limit: {GE} 1"),
    bad("limit-501", "GET", "/jobs?limit=501", 422, f"query.limit: {LE} 500"),
    bad("limit-abc", "GET", "/jobs?limit=abc", 422, f"query.limit: {NOT_INT}"),
    bad("state-bogus", "GET", "/jobs?state=bogus", 422, "query.state: Input should be 'available'"),
    bad("name-with-space", "GET", "/jobs?name=bad%20name", 422, f"query.name: {NAME_HINT}"),
    bad("cursor-garbage", "GET", "/jobs?cursor=garbage", 422, NOT_ISSUED),
    bad("cursor-too-long", "GET", "/jobs?cursor=" + "c" * 1025, 422, "cursor"),
    bad("succeeded-limit-0", "GET", "/jobs/succeeded?limit=0", 422, "query.limit"),
    bad("succeeded-cursor-garbage", "GET", "/jobs/succeeded?cursor=garbage", 422, NOT_ISSUED),
    bad("failed-name-with-slash", "GET", "/jobs/failed?name=a%2Fb", 422, "query.name"),
    bad("failed-cursor-garbage", "GET", "/jobs/failed?cursor=garbage", 422, NOT_ISSUED),
    bad("cursor-with-nul-id", "GET", f"/jobs?cursor={NUL_CURSOR}", 422, NOT_ISSUED),
    bad("search-with-nul", "GET", "/jobs?q=a%00b", 422, "query.q: must not contain NUL"),
    bad(
        "succeeded-search-nul", "GET", "/jobs/succeeded?q=%00", 422, "query.q: must not contain NUL"
    ),
    # schemathesis's find on PostgreSQL, which cannot even compare text holding NUL
    bad("failed-search-nul", "GET", "/jobs/failed?limit=330&q=%C3%BB%00%C2%99", 422, "query.q"),
]

JOB_ACTIONS = [
    ("get", "GET", "/jobs/{id}"),
    ("delete", "DELETE", "/jobs/{id}"),
    ("retry", "POST", "/jobs/{id}/retry"),
]
UNKNOWN_JOB_IDS = [
    ("nope", "nope", "job 'nope' not found"),
    ("hex", HEX_ID, f"job '{HEX_ID}' not found"),
    ("dotdot-slash-etc", "..%2Fetc", "not found"),  # decoded to /jobs/../etc by the server
    ("dotdot", "%2E%2E", "not found"),
    ("1000-chars", LONG_ID, "not found"),
    ("nul", "a%00b", "not found"),
]
UNKNOWN_JOB_CASES = [
    bad(f"{action}-job-{label}", method, path.format(id=job_id), 404, detail)
    for label, job_id, detail in UNKNOWN_JOB_IDS
    for action, method, path in JOB_ACTIONS
]

LEASE_ACTIONS: list[tuple[str, str, str, dict[str, Any]]] = [  # each with a valid body
    ("ack", "POST", "/leases/{id}/ack", {}),
    ("fail", "POST", "/leases/{id}/fail", {"json": BOOM}),
    ("extend", "POST", "/leases/{id}/extend", {"json": LEASE_MS}),
    ("release", "DELETE", "/leases/{id}", {}),
]
UNKNOWN_LEASE_IDS = [
    ("nope", "nope", "lease 'nope' not found"),
    ("abc.1", "abc.1", "lease 'abc.1' not found"),
    ("abc.0", "abc.0", "lease 'abc.0' not found"),
    ("abc.-1", "abc.-1", "lease 'abc.-1' not found"),
    ("abc.01", "abc.01", "lease 'abc.01' not found"),
    ("1000-chars", LONG_ID + ".1", "not found"),
    ("nul", "a%00b.1", "not found"),
]
UNKNOWN_LEASE_CASES = [
    bad(f"{action}-lease-{label}", method, path.format(id=lease_id), 404, detail, **body)
    for label, lease_id, detail in UNKNOWN_LEASE_IDS
    for action, method, path, body in LEASE_ACTIONS
]


@pytest.mark.parametrize("case", ENQUEUE_CASES)
async def test_bad_enqueue_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, case: Bad
) -> None:
    assert_clear_error(await case.send(client), case.status, case.detail)
    assert await all_jobs(client) == []


async def test_a_whole_batch_of_bad_enqueues_leaves_every_list_empty(
    client: httpx.AsyncClient,
) -> None:
    for param in ENQUEUE_CASES:
        case: Bad = param.values[0]  # type: ignore[assignment]
        response = await case.send(client)
        assert response.status_code >= 400, f"{param.id}: {response.text[:300]}"
    assert await all_jobs(client) == []


@pytest.mark.parametrize(
    "case", LEASE_CASES + LEASE_BODY_CASES + LIST_CASES + UNKNOWN_JOB_CASES + UNKNOWN_LEASE_CASES
)
async def test_bad_request_gets_a_clear_error(client: httpx.AsyncClient, case: Bad) -> None:
    assert_clear_error(await case.send(client), case.status, case.detail)
    assert await all_jobs(client) == []


MINE = "/leases/{lease}"  # the lease worker-1 really holds
NEXT = "/leases/{job}.2"  # a lease number higher than any issued

LIVE_LEASE_CASES = [
    bad("ack-higher-lease-number", "POST", NEXT + "/ack", 404, "lease '{job}.2' not found"),
    bad("fail-higher-lease-number", "POST", NEXT + "/fail", 404, "not found", json=BOOM),
    bad("extend-higher-lease-number", "POST", NEXT + "/extend", 404, "not found", json=LEASE_MS),
    bad("release-higher-lease-number", "DELETE", NEXT, 404, "not found"),
    bad("release-huge-lease-number", "DELETE", "/leases/{job}." + "9" * 18, 404, "not found"),
    bad("ack-lease-number-0", "POST", "/leases/{job}.0/ack", 404, "not found"),
    bad("ack-lease-number-01", "POST", "/leases/{job}.01/ack", 404, "not found"),
    bad("release-lease-number-minus-1", "DELETE", "/leases/{job}.-1", 404, "not found"),
    bad("ack-job-id-as-lease-id", "POST", "/leases/{job}/ack", 404, "not found"),
    bad("fail-no-body", "POST", MINE + "/fail", 422, NO_BODY),
    fail_case("fail-missing-exception", "body.exception", MINE + "/fail", exception=NO_JSON),
    fail_case("fail-exception-over-64kib", "64 KiB", MINE + "/fail", exception="é" * 32_769),
    fail_case("fail-retry-in-ms-negative", "body.retry_in_ms", MINE + "/fail", retry_in_ms=-1),
    fail_case("fail-retry-in-ms-string", "body.retry_in_ms", MINE + "/fail", retry_in_ms="5"),
    fail_case("fail-typo-retry-in", f"body.retry_in: {UNKNOWN}", MINE + "/fail", retry_in=5),
    bad("extend-no-body", "POST", MINE + "/extend", 422, NO_BODY),
    extend_case("extend-lease-ms-0", "body.lease_ms", MINE + "/extend", lease_ms=0),
    extend_case(
        "extend-lease-ms-over-a-day", "body.lease_ms", MINE + "/extend", lease_ms=86_400_001
    ),
    bad("delete-reserved-job", "DELETE", "/jobs/{job}", 409, "is reserved by a worker"),
    bad("retry-reserved-job", "POST", "/jobs/{job}/retry", 409, "is reserved, not failed"),
]


@pytest.mark.parametrize("case", LIVE_LEASE_CASES)
async def test_bad_request_on_a_live_lease_changes_nothing(
    client: httpx.AsyncClient, case: Bad
) -> None:
    job_id, lease_id = await reserved_job(client)
    before = await get_job(client, job_id)
    assert before["state"] == "reserved" and before["attempts"] == 1

    response = await case.send(client, job=job_id, lease=lease_id)
    assert_clear_error(response, case.status, case.detail.format(job=job_id))

    assert await get_job(client, job_id) == before  # still reserved, same attempts
    ack = await client.post(f"/leases/{lease_id}/ack")  # and the real lease still holds
    assert ack.status_code == 200, ack.text
    assert ack.json()["attempts"] == 1


DONE = "has already succeeded"

FINISHED_CASES = [
    bad("ack-twice", "POST", MINE + "/ack", 409, DONE),
    bad("fail-after-ack", "POST", MINE + "/fail", 409, DONE, json=BOOM),
    bad("extend-after-ack", "POST", MINE + "/extend", 409, DONE, json=LEASE_MS),
    bad("release-after-ack", "DELETE", MINE, 409, DONE),
    bad("ack-higher-lease-number", "POST", NEXT + "/ack", 404, "not found"),
    bad("retry-succeeded-job", "POST", "/jobs/{job}/retry", 409, "is succeeded, not failed"),
]


@pytest.mark.parametrize("case", FINISHED_CASES)
async def test_stale_lease_of_a_succeeded_job_changes_nothing(
    client: httpx.AsyncClient, case: Bad
) -> None:
    job_id, lease_id = await reserved_job(client)
    acked = await client.post(f"/leases/{lease_id}/ack")
    assert acked.status_code == 200, acked.text
    before = await get_job(client, job_id)

    response = await case.send(client, job=job_id, lease=lease_id)
    assert_clear_error(response, case.status, case.detail.format(job=job_id))

    assert await get_job(client, job_id) == before
    assert [job["id"] for job in await all_jobs(client)] == [job_id]


async def test_pending_jobs_refuse_retry_and_released_leases(client: httpx.AsyncClient) -> None:
    job = await enqueue(client)
    assert_clear_error(
        await client.post(f"/jobs/{job['id']}/retry"), 409, "is available, not failed"
    )

    (held,) = await lease(client)
    released = await client.delete(f"/leases/{held['id']}")
    assert released.status_code == 204, released.text
    before = await get_job(client, job["id"])
    assert before["state"] == "available" and before["attempts"] == 0

    for method, action, body in [
        ("POST", "ack", None),
        ("POST", "fail", {"exception": "x"}),
        ("POST", "extend", {"lease_ms": 60_000}),
    ]:
        response = await client.request(method, f"/leases/{held['id']}/{action}", json=body)
        assert_clear_error(response, 409, "it was released")
    assert_clear_error(await client.delete(f"/leases/{held['id']}"), 409, "it was released")
    assert await get_job(client, job["id"]) == before


async def test_cursor_of_one_list_is_refused_by_the_others(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await enqueue(client)
    for held in await lease(client, max_jobs=2):
        assert (await client.post(f"/leases/{held['id']}/ack")).status_code == 200
    first = await client.get("/jobs/succeeded", params={"limit": 1})
    cursor = first.json()["next_cursor"]
    assert isinstance(cursor, str) and cursor

    for path in ("/jobs/failed", "/jobs"):
        response = await client.get(path, params={"cursor": cursor})
        assert_clear_error(response, 422, NOT_ISSUED)
    page_two = await client.get("/jobs/succeeded", params={"limit": 1, "cursor": cursor})
    assert page_two.status_code == 200 and len(page_two.json()["items"]) == 1


async def test_payload_limit_counts_utf8_bytes_not_characters(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'small.db'}", max_payload_bytes=8
    )
    app = create_app(settings, OffsetClock())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test") as client:
            for payload, size in [("x" * 9, 9), ("é" * 5, 10), ("€" * 3, 9)]:
                response = await client.post("/jobs", json=job_body(payload=payload))
                assert_clear_error(
                    response, 413, f"payload is {size} bytes of UTF-8; the limit is 8 bytes"
                )
            assert await all_jobs(client) == []
            for payload in ("x" * 8, "é" * 4):  # exactly at the limit: accepted
                accepted = await client.post("/jobs", json=job_body(payload=payload))
                assert accepted.status_code == 201, accepted.text
            assert sorted(job["payload"] for job in await all_jobs(client)) == ["xxxxxxxx", "éééé"]
