"""The committed spec is a product: it must match what the app serves, and say enough."""

import json
import keyword
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from app.main import ROUTERS

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


async def test_committed_spec_matches_the_served_one(client: httpx.AsyncClient) -> None:
    served = (await client.get("/openapi.json")).json()
    committed = json.loads(SPEC_PATH.read_text())
    assert committed == served, "openapi/openapi.json is stale: run scripts/export_openapi.py"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
    ]


def test_every_operation_is_described_with_its_errors() -> None:
    spec = json.loads(SPEC_PATH.read_text())
    expected = {
        ("/jobs", "post"),
        ("/jobs", "get"),
        ("/jobs/succeeded", "get"),
        ("/jobs/failed", "get"),
        ("/jobs/{job_id}", "get"),
        ("/jobs/{job_id}", "delete"),
        ("/jobs/{job_id}/retry", "post"),
        ("/leases", "post"),
        ("/leases/{lease_id}/ack", "post"),
        ("/leases/{lease_id}/fail", "post"),
        ("/leases/{lease_id}/extend", "post"),
        ("/leases/{lease_id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/schedules", "get"),
        ("/schedules/{schedule_id}", "put"),
        ("/schedules/{schedule_id}", "get"),
        ("/schedules/{schedule_id}", "delete"),
    }
    found = {(path, method) for path, method, _ in operations(spec)}
    assert expected <= found
    for path, method, op in operations(spec):
        assert op.get("summary") and op.get("operationId"), (path, method)
        if path not in ("/healthz", "/readyz", "/auth/me"):  # these take no input at all
            assert "422" in op["responses"], (path, method)
        if path == "/auth/me":
            assert "401" in op["responses"]
        if "{" in path:
            assert "404" in op["responses"], (path, method)
    schemas = spec["components"]["schemas"]
    for name in (
        "EnqueueRequest",
        "LeaseRequest",
        "FailRequest",
        "ExtendRequest",
        "JobOut",
        "ScheduleRequest",
        "ScheduleOut",
    ):
        assert schemas[name].get("examples"), name
    assert schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"


def test_spec_is_valid_openapi() -> None:
    """A maintained validator (openapi-spec-validator) accepts it: generators can trust it."""
    validate(json.loads(SPEC_PATH.read_text()))


OPERATION_IDS = SPEC_PATH.parent / "operation_ids.txt"
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
# Reserved in JavaScript/TypeScript; Python's come from `keyword`.
JS_RESERVED = set(
    "await break case catch class const continue debugger default delete do else enum export "
    "extends false finally for function if implements import in instanceof interface let new "
    "null package private protected public return static super switch this throw true try "
    "typeof var void while with yield".split()
)


def test_operation_ids_are_stable_identifiers() -> None:
    """Generated clients name their functions after operationIds: each must be explicit,
    unique and a plain identifier in Python and TypeScript, and none of the committed ones
    may go (renaming one breaks clients generated before); new ones may be added."""
    ids = [op.get("operationId") for _, _, op in operations(json.loads(SPEC_PATH.read_text()))]
    assert all(isinstance(i, str) and IDENTIFIER.match(i) for i in ids), ids
    assert len(set(ids)) == len(ids), sorted(ids)
    clashes = [
        i for i in ids if keyword.iskeyword(i) or keyword.issoftkeyword(i) or i in JS_RESERVED
    ]
    assert not clashes
    committed = set(OPERATION_IDS.read_text().split())
    assert committed <= set(ids), f"operationIds gone: {sorted(committed - set(ids))}"


def test_every_route_sets_its_operation_id() -> None:
    """Explicit ids, never derived from a function name that a refactoring may change."""
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) == len(operations(json.loads(SPEC_PATH.read_text())))
    assert [r.path for r in routes if not r.operation_id] == []
