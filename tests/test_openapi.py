"""The committed spec is a product: it must match what the app serves, and say enough."""

import json
from pathlib import Path
from typing import Any

import httpx

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
    }
    found = {(path, method) for path, method, _ in operations(spec)}
    assert expected <= found
    for path, method, op in operations(spec):
        assert op.get("summary") and op.get("operationId"), (path, method)
        if path not in ("/healthz", "/readyz"):
            assert "422" in op["responses"], (path, method)
        if "{" in path:
            assert "404" in op["responses"], (path, method)
    schemas = spec["components"]["schemas"]
    for name in ("EnqueueRequest", "LeaseRequest", "FailRequest", "ExtendRequest", "JobOut"):
        assert schemas[name].get("examples"), name
    assert schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"
